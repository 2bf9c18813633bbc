"""Smoke run of the whole τ²-bench loop with an openk2 model as agent *and* user simulator, served in-process
through `openk2.llm.LocalBackend` (the engine `openk2 serve` runs):

    PYTHONPATH=src python -m openk2.eval.tau2.smoke --model-dir DIR --max-steps 6
    PYTHONPATH=src python -m openk2.eval.tau2.smoke --max-steps 6   # an untrained `tiny` model, built on the fly

One task per domain (the first), scored like the benchmark; prints one JSON line per domain. The numbers are
meaningless for an untrained model; the point is that prompts, native tool calls, the user simulator, limits
and scoring run end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from openk2.eval.tau2.env import make_env
from openk2.eval.tau2.orchestrator import client_chat, run_episode
from openk2.eval.tau2.scoring import score_episode
from openk2.eval.tau2.tasks import DOMAINS, load_tasks


def _untrained_model_dir(path: Path) -> Path:
    from openk2.model import build_model, get_preset
    from openk2.serve.testing import make_model_dir, toy_tokenizer

    tok = toy_tokenizer()
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=65536), seed=0)
    return make_model_dir(path / "tiny-k2", model.eval(), tok)


async def smoke(model_dir: Path, max_steps: int, max_tokens: int, domains: list[str]) -> dict[str, dict]:
    from openk2.llm.client import LLMClient
    from openk2.llm.local import LocalBackend

    backend = LocalBackend.from_model_dir(model_dir, device="cpu", max_batch=2, max_len=65536)
    chat = client_chat(LLMClient(backend, model=backend.model_name), temperature=0.0, max_tokens=max_tokens)
    out = {}
    try:
        for domain in domains:
            task = load_tasks(domain)[0]
            env = make_env(domain, task=task)
            start = time.time()
            ep = await run_episode(env, chat, chat, max_steps=max_steps)
            result = await score_episode(env, ep.transcript, ep.termination)
            out[domain] = {"task": task.id, "termination": ep.termination, "steps": ep.steps, "errors": ep.errors,
                           "reward": result["reward"], "seconds": round(time.time() - start, 1), "error": ep.error}
            print(json.dumps({domain: out[domain]}), flush=True)
    finally:
        await backend.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--domains", default=",".join(DOMAINS))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or _untrained_model_dir(Path(tmp))
        asyncio.run(smoke(model_dir, args.max_steps, args.max_tokens, args.domains.split(",")))


if __name__ == "__main__":
    main()
