"""Knowledge rephrasing for pretraining (K2 §2.2): prompt library, chunk-wise autoregressive rewriting, fidelity
verification, and the resumable pipeline behind `openk2 rephrase` (see `pipeline`)."""

from openk2.data.rephrase.chunking import Chunk, ChunkedDocument, chunk_document, reassemble, sentence_spans, tail
from openk2.data.rephrase.embedding import (
    Embedder,
    HashingEmbedder,
    StaticEmbedder,
    TransformersEmbedder,
    load_embedder,
)
from openk2.data.rephrase.fidelity import ALL_CHECKS, DEFAULT_CHECKS, CheckResult, FidelityConfig, verify, verify_sync
from openk2.data.rephrase.pipeline import (
    InputDoc,
    LLMRephraser,
    RephraseConfig,
    Rephraser,
    Reply,
    read_inputs,
    rewrite_document,
    run_rephrase,
)
from openk2.data.rephrase.prompts import FormatError, PromptLibraryError, Style, approx_tokens, load_library

__all__ = [
    "ALL_CHECKS", "DEFAULT_CHECKS", "CheckResult", "Chunk", "ChunkedDocument", "Embedder", "FidelityConfig",
    "FormatError", "HashingEmbedder", "InputDoc", "LLMRephraser", "PromptLibraryError", "RephraseConfig",
    "Rephraser", "Reply", "StaticEmbedder", "Style", "TransformersEmbedder", "approx_tokens", "chunk_document",
    "load_embedder", "load_library",
    "read_inputs", "reassemble", "rewrite_document", "run_rephrase", "sentence_spans", "tail", "verify",
    "verify_sync",
]
