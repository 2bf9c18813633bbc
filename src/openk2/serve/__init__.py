"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine (`openk2 serve`)."""

from openk2.serve.engine import Engine, FinishEvent, Generation, SamplingParams, TokenEvent
from openk2.serve.model_dir import LoadedModel, ModelBundle, ModelSourceError, load_model_dir, resolve_tokenizer_source
from openk2.serve.protocol import APIError
from openk2.serve.server import ServerThread, build_service, serve
from openk2.serve.service import OpenAIService

__all__ = [
    "APIError", "Engine", "FinishEvent", "Generation", "LoadedModel", "ModelBundle", "ModelSourceError",
    "OpenAIService", "SamplingParams", "ServerThread", "TokenEvent", "build_service", "load_model_dir",
    "resolve_tokenizer_source", "serve",
]
