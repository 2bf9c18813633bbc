"""Peak training memory and step time of the nano model with each activation-memory switch (CPU).

    .venv/bin/python bench/activation_memory.py [--steps 6] [--batch 8] [--seq 256] [--json out.json]

Memory is torch's own accounting, not the process RSS: a profiler with `profile_memory=True` records every
allocation and free of one training step (forward, backward, optimizer step); the running sum of those events,
started from the bytes live before the step (parameters, optimizer state, buffers), gives the step's peak.
"activations" is the peak minus that baseline, i.e. what the switches act on. Step time is the median of
`--steps` timed steps after two warm-up steps; the CPU is shared with other jobs, so times are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info  # noqa: E402

from openk2.model import build_model, get_preset  # noqa: E402
from openk2.optim import MuonClip  # noqa: E402
from openk2.parallel.activation import apply_activation_memory, peak_bytes  # noqa: E402
from openk2.parallel.layout import ParallelLayout  # noqa: E402

CONFIGS: dict[str, dict] = {
    "baseline": {},
    "recompute": dict(recompute="selective"),
    "recompute+moe_down": dict(recompute="selective+moe_down"),
    "fp8": dict(fp8_activations=True),
    "recompute+fp8": dict(recompute="selective", fp8_activations=True),
    "recompute+fp8+offload": dict(recompute="selective", fp8_activations=True, offload_activations=True),
}


def _live_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


class Run:
    """One configuration: its own model (same seed), optimizer and batch stream."""

    def __init__(self, name: str, switches: dict, args: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.name, self.switches, self.args = name, switches, args
        self.cfg = get_preset("nano", vocab_size=args.vocab)
        self.model = build_model(self.cfg, seed=0)
        apply_activation_memory(self.model, ParallelLayout(**switches).resolve(1))
        self.model.train()
        self.opt = MuonClip(self.model, lr=2e-2)
        self.gen = torch.Generator().manual_seed(1)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self) -> float:
        a = self.args
        x = torch.randint(0, self.cfg.vocab_size, (a.batch, a.seq + 1), generator=self.gen)
        t0 = time.perf_counter()
        loss = self.model(x[:, :-1], labels=x[:, 1:], reduction="sum", return_logits=False).loss
        (loss / (a.batch * a.seq)).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        self.losses.append(float(loss.detach()) / (a.batch * a.seq))
        return dt

    def memory(self) -> tuple[int, int]:
        base = _live_bytes(self.model, self.opt)
        return base, peak_bytes(self.step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=2048, help="the nano recipe's tokenizer size")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = [Run(n, CONFIGS[n], args) for n in args.configs.split(",")]
    for r in runs:  # warm-up
        r.step()
        r.step()
    # Round-robin timing, so that load from other jobs on the shared CPU hits every config alike.
    for _ in range(args.steps):
        for r in runs:
            r.times.append(r.step())
    rows = []
    for r in runs:
        base, delta = r.memory()
        rows.append({"config": r.name, "switches": r.switches, "step_s": statistics.median(r.times),
                     "step_s_min": min(r.times), "step_times": r.times, "baseline_mib": base / 2**20,
                     "activation_peak_mib": delta / 2**20, "peak_mib": (base + delta) / 2**20,
                     "losses": r.losses})
    base = rows[0]
    print(f"# nano, batch {args.batch} x seq {args.seq}, fp32 CPU; {machine_info()}")
    print("| config | peak MiB | vs baseline | above-baseline peak MiB | vs baseline | step s (median / min) "
          "| vs baseline (median / min) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib'] - 1:+.0%} | "
              f"{r['activation_peak_mib']:.0f} | {r['activation_peak_mib'] / base['activation_peak_mib'] - 1:+.0%} | "
              f"{r['step_s']:.2f} / {r['step_s_min']:.2f} | {r['step_s'] / base['step_s'] - 1:+.0%} / "
              f"{r['step_s_min'] / base['step_s_min'] - 1:+.0%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
