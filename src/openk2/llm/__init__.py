"""One async LLM client for every pipeline, over HTTP, in-process or replayed backends (see `client`)."""

from openk2.llm.cache import ResponseCache, request_key
from openk2.llm.client import (
    CHAT,
    COMPLETIONS,
    Backend,
    ChatResponse,
    CompletionResponse,
    LLMClient,
    LLMError,
    Message,
)
from openk2.llm.openai_http import OpenAIHTTPBackend
from openk2.llm.replay import ReplayBackend, ReplayMiss, chat_response
from openk2.llm.usage import ModelUsage, Price, Usage, UsageTracker

__all__ = [
    "CHAT", "COMPLETIONS", "Backend", "ChatResponse", "CompletionResponse", "LLMClient", "LLMError", "LocalBackend",
    "Message", "ModelUsage", "OpenAIHTTPBackend", "Price", "ReplayBackend", "ReplayMiss", "ResponseCache", "Usage",
    "UsageTracker", "chat_response", "request_key",
]


def __getattr__(name: str):
    # LocalBackend pulls in torch and the model; import it only when asked for.
    if name == "LocalBackend":
        from openk2.llm.local import LocalBackend

        return LocalBackend
    raise AttributeError(name)
