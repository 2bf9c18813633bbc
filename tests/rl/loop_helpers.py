"""Test helpers of the RL loop: a tiny digits model directory and a plain reference engine (full forward per
token, no cache, one request at a time): slow but obviously right, for the controller's unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import torch

from openk2.rl.types import GenOut, SamplingParams


class ReferenceEngine:
    """`RolloutEngine` by the definition: sample token by token from the full forward at the request's
    temperature, seeded per request; behaviour log-probs under the tempered distribution."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.version = model.eval(), 0
        self.requests = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenOut:
        await asyncio.sleep(0)
        self.requests += 1
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else 0)
        ids, logps = list(prompt_ids), []
        finish = "length"
        with torch.no_grad():
            for _ in range(params.max_new_tokens):
                logits_V = self.model(torch.tensor([ids])).logits[0, -1].float()
                if params.temperature <= 0:
                    tok = int(logits_V.argmax())
                    logp_V = logits_V.log_softmax(-1)
                else:
                    logp_V = (logits_V / params.temperature).log_softmax(-1)
                    tok = int(torch.multinomial(logp_V.exp(), 1, generator=gen))
                ids.append(tok)
                logps.append(float(logp_V[tok]))
                if tok in params.stop_token_ids:
                    finish = "stop"
                    break
        return GenOut(ids[len(prompt_ids):], logps, finish, self.version)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        state = dict(named_tensors)
        self.model.load_state_dict(state)
        self.version = version

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def abort(self) -> list[str]:
        return []


def reference_engine(model: torch.nn.Module, tokenizer: object) -> ReferenceEngine:
    return ReferenceEngine(model)


def tiny_digits_model_dir(path: Path, sft_steps: int = 10, n_records: int = 64, seed: int = 0) -> Path:
    """A tiny K2 model briefly trained on digits SFT records (a weak warm start), saved as a model directory."""
    from openk2.data.chat_format import ChatFormat
    from openk2.rl.envs.procedural import sft_records
    from openk2.serve.testing import make_model_dir, toy_tokenizer
    from openk2.serve.testing_checkpoints import train_on_rows

    records = sft_records(n_records, seed=seed, kinds=("reverse",), levels=(1,))
    tok = toy_tokenizer(extra_texts=[r["messages"][1]["content"] for r in records])
    fmt = ChatFormat.k2(tok)
    rows = [fmt.render_ids_and_mask(r["messages"]) for r in records]
    model = train_on_rows(rows, tok.vocab_size, tok.pad_id, steps=sft_steps, seed=seed, max_len=256)
    return make_model_dir(path, model, tok)


__all__ = ["ReferenceEngine", "reference_engine", "tiny_digits_model_dir"]
