"""Model specs (`--model`, `--user-model`) -> `openk2.llm` clients.

    runs/nano                 a training run directory, served in process (batched decoding, no HTTP)
    path/to/hf-dir            a HF-format checkpoint directory with its tokenizer, served in process
    openai:URL                any OpenAI-compatible endpoint (openk2 serve, vLLM, SGLang, a hosted API);
                              the model id comes from --model-name, the key from the --api-key-env variable
    replay:FILE.jsonl         recorded responses (`ResponseCache.export_jsonl`), e.g. for tests
    replay:CACHE_DIR          a `ResponseCache` directory from an earlier run

Every client gets the run's response cache (so a resumed run re-asks nothing) and a usage tracker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.llm import LLMClient, OpenAIHTTPBackend, ReplayBackend, ResponseCache, UsageTracker
from openk2.llm.client import Backend

SPEC_FORMS = ("a run directory", "a HF model directory", "openai:URL (with --model-name)", "replay:FILE.jsonl",
              "replay:CACHE_DIR")


class ModelSpecError(ValueError):
    """A model spec that names nothing usable; the message lists the valid forms."""


@dataclass
class ModelHandle:
    client: LLMClient
    spec: str
    kind: str  # "local", "openai" or "replay"
    name: str
    run_dir: Path | None = None  # set for training run directories (the world benchmarks read its config)
    info: dict[str, Any] = field(default_factory=dict)  # JSON-ready description saved in results.json

    async def aclose(self) -> None:
        await self.client.aclose()


def load_local_backend(path: Path, *, max_batch: int = 16, device: str = "auto", dtype: str = "auto",
                       tool_call_parser: str | None = None) -> Backend:
    """The one place that turns a model directory into an in-process backend: the serving stack's loader
    (`openk2.model_dir.load_model_dir`: openk2 runs, export-hf output, third-party DeepseekV3-family checkpoints
    with their own tokenizer, chat template and tool-call parser) behind the server's engine."""
    from openk2.llm.local import LocalBackend

    return LocalBackend.from_model_dir(path, device=device, dtype=dtype, max_batch=max_batch,
                                       tool_call_parser=tool_call_parser)


def _is_run_dir(path: Path) -> bool:
    return (path / "train_config.json").is_file() or (path / "checkpoints").is_dir()


def open_model(spec: str, *, model_name: str | None = None, api_key_env: str = "OPENAI_API_KEY",
               concurrency: int = 8, cache_dir: Path | None = None, usage: UsageTracker | None = None,
               max_retries: int = 3, timeout: float = 600.0, device: str = "auto",
               tool_call_parser: str | None = None) -> ModelHandle:
    """Resolve a model spec into a client (see the module docstring for the forms)."""
    usage = usage if usage is not None else UsageTracker()
    cache = ResponseCache(cache_dir) if cache_dir is not None else None
    if spec.startswith("openai:"):
        url = spec.removeprefix("openai:")
        if not url.startswith(("http://", "https://")):
            raise ModelSpecError(f"{spec!r}: openai: needs an http(s) URL, e.g. openai:http://127.0.0.1:8000/v1")
        if not model_name:
            raise ModelSpecError(f"{spec!r}: pass --model-name (the model id the endpoint serves)")
        backend = OpenAIHTTPBackend(url, api_key=os.environ.get(api_key_env), max_concurrency=concurrency,
                                    max_retries=max_retries, timeout=timeout)
        return ModelHandle(LLMClient(backend, model=model_name, cache=cache, usage=usage), spec, "openai",
                           model_name, info={"url": url, "model_name": model_name, "api_key_env": api_key_env})
    if spec.startswith("replay:"):
        path = Path(spec.removeprefix("replay:"))
        if path.is_dir():
            backend = ReplayBackend.from_cache(path)
        elif path.is_file():
            backend = ReplayBackend.from_jsonl(path)
        else:
            raise ModelSpecError(f"{spec!r}: {path} is neither a replay file nor a cache directory")
        name = model_name or "replay"
        return ModelHandle(LLMClient(backend, model=name, cache=cache, usage=usage), spec, "replay", name,
                           info={"path": str(path)})
    path = Path(spec)
    if path.is_dir():
        from openk2.serve.model_dir import ModelSourceError

        try:
            backend = load_local_backend(path, max_batch=max(1, concurrency), device=device,
                                         tool_call_parser=tool_call_parser)
        except (ModelSourceError, OSError) as e:
            raise ModelSpecError(f"{spec!r}: {e}") from None
        name = getattr(backend, "model_name", path.resolve().name)
        return ModelHandle(LLMClient(backend, model=name, cache=cache, usage=usage), spec, "local", name,
                           run_dir=path if _is_run_dir(path) else None, info={"path": str(path.resolve())})
    raise ModelSpecError(f"unknown model spec {spec!r}; valid forms: {', '.join(SPEC_FORMS)}")
