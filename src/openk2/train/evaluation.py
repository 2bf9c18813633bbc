"""Base-model evaluation on the world corpus: knowledge probes and samples, via batched cached generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openk2.data.tokenizer import Tokenizer
from openk2.data.world import Probe
from openk2.model import K2Model


def complete(
    model: K2Model, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int = 12,
    batch_size: int = 64, temperature: float = 0.0, seed: int = 0,
) -> list[str]:
    """Continuations (without the prompts) for each prompt, BOS-prefixed like the training documents."""
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer.encode_batch(list(prompts[i:i + batch_size]), add_bos=True)
        out_BT = model.generate(ids, max_new_tokens, temperature=temperature, generator=gen,
                                eos_token_id=tokenizer.bos_id)
        new_BT = out_BT[:, max(len(x) for x in ids):].tolist()  # generate may stop early at eos
        for row in new_BT:
            if tokenizer.bos_id in row:  # a new document starts: the continuation ended
                row = row[: row.index(tokenizer.bos_id)]
            outs.append(tokenizer.decode(row))
    return outs


def probe_report(model: K2Model, tokenizer: Tokenizer, probes: Sequence[Probe]) -> dict[str, float]:
    """Accuracy per (split, kind), plus 'seen' overall: exact first-line answer matches under greedy decoding.

    The same samples, scorer and breakdown as the `world-*` benchmarks of `openk2 eval`
    (`openk2.eval.benchmarks.world`); only the generation runs in process on the training model."""
    from openk2.eval.benchmarks.world import probe_breakdown, probe_sample, score_probe
    from openk2.eval.task import Completion

    samples = [probe_sample(p) for p in probes]
    completions = complete(model, tokenizer, [s.prompt or "" for s in samples])
    values = [score_probe(s, Completion(text=c)).value for s, c in zip(samples, completions, strict=True)]
    return probe_breakdown(samples, values)
