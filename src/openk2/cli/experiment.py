"""Experiment commands: `openk2 experiment qk-clip`, `openk2 experiment muon-vs-adamw` (CPU, small scale)."""

from __future__ import annotations

from pathlib import Path

import typer

from openk2.cli.app import app, console, fail

experiment_app = typer.Typer(help="Small-scale optimizer experiments on the nano model (CPU).", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


def _overrides(items: list[str] | None) -> dict:
    """--set key=value model-config overrides (values parsed as int, float, None/true/false, else str)."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            fail(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        if raw.lower() in ("none", "null"):
            value = None
        elif raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        out[key] = value
    return out


def _log(line: str) -> None:
    console.print(line, markup=False, highlight=False)  # run names like "[muon]" are not rich markup


def _threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _parse_lrs(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        fail(f"learning rates must be comma-separated numbers, got {text!r}")


@experiment_app.command("qk-clip")
def qk_clip(
    out: Path = typer.Option(Path("runs/experiments/qk-clip"), help="Output directory (JSON + PNG)."),
    steps: int = typer.Option(150, help="Optimizer steps per run (two runs: vanilla Muon, MuonClip)."),
    lr: float = typer.Option(0.05, help="Aggressive learning rate (match_rms_adamw scaling)."),
    tau: float = typer.Option(30.0, help="QK-Clip threshold (K2: 100; its small ablation: 30)."),
    batch: int = typer.Option(8, help="Sequences per step."),
    seq: int = typer.Option(128, help="Tokens (bytes) per sequence."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch intra-op threads (1 is fastest on a shared, oversubscribed CPU)."),
    set_: list[str] = typer.Option(None, "--set", help="Model-config override key=value (repeatable)."),
) -> None:
    """K2 Figure 2 in miniature: max logits of vanilla Muon grow past tau; MuonClip holds them at tau."""
    from openk2.model import ConfigError
    from openk2.optim.experiments import run_qk_clip

    _threads(threads)
    try:
        result = run_qk_clip(out, steps=steps, lr=lr, tau=tau, batch=batch, seq=seq, seed=seed,
                             model_overrides=_overrides(set_), log=_log)
    except ConfigError as e:
        fail(str(e))
    for name, s in result["summary"].items():
        console.print(f"{name}: peak max logit {s['peak_max_logit']:.1f}, final {s['final_max_logit']:.1f}, "
                      f"final val loss {s['final_val_loss']:.4f}, {s['seconds']:.0f}s")
    console.print(f"wrote {out / 'qk_clip.json'} and {out / 'qk_clip.png'} ({result['seconds']:.0f}s)")


@experiment_app.command("muon-vs-adamw")
def muon_vs_adamw(
    out: Path = typer.Option(Path("runs/experiments/muon-vs-adamw"), help="Output directory (JSON + PNG)."),
    steps: int = typer.Option(80, help="Optimizer steps per run."),
    lrs_muon: str = typer.Option("0.001,0.003,0.01", help="Comma-separated Muon learning rates."),
    lrs_adamw: str = typer.Option("0.001,0.003,0.01", help="Comma-separated AdamW learning rates."),
    target: float = typer.Option(None, help="Target validation loss (default: the lowest both optimizers reach)."),
    batch: int = typer.Option(8, help="Sequences per step."),
    seq: int = typer.Option(128, help="Tokens (bytes) per sequence."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, help="torch intra-op threads (1 is fastest on a shared, oversubscribed CPU)."),
    set_: list[str] = typer.Option(None, "--set", help="Model-config override key=value (repeatable)."),
) -> None:
    """Tokens Muon and AdamW (best lr of a small sweep each) need to reach a target validation loss."""
    from openk2.model import ConfigError
    from openk2.optim.experiments import run_muon_vs_adamw

    _threads(threads)
    try:
        result = run_muon_vs_adamw(out, steps=steps, lrs_muon=_parse_lrs(lrs_muon), lrs_adamw=_parse_lrs(lrs_adamw),
                                   batch=batch, seq=seq, target=target, seed=seed, model_overrides=_overrides(set_),
                                   log=_log)
    except ConfigError as e:
        fail(str(e))
    s = result["summary"]
    console.print(f"target val loss {s['target_val_loss']:.4f}; best runs {s['best_run']}; "
                  f"tokens {s['best_tokens']}; AdamW/Muon tokens = {s['adamw_over_muon_tokens']}")
    console.print(f"wrote {out / 'muon_vs_adamw.json'} and {out / 'muon_vs_adamw.png'} ({result['seconds']:.0f}s)")


@experiment_app.command("rephrasing")
def rephrasing(
    out: Path = typer.Option(Path("runs/experiments/rephrasing"), help="Output directory (JSON + PNG)."),
    model: str = typer.Option("world", "--model", help="Rephraser: world (programmatic renderer, CPU) or any "
                                                       "`openk2 rephrase` model spec (run dir, HF dir, openai:URL)."),
    model_name: str = typer.Option(None, "--model-name", help="Model id for an openai: endpoint."),
    style: str = typer.Option("wrap-medium", help="Rephrasing style (openk2 rephrase --list-styles)."),
    n: int = typer.Option(10, help="Epochs of the repeated rows = rephrasings of the last row."),
    people: int = typer.Option(24, help="People in the world (10% held out)."),
    seeds: str = typer.Option("0,1", help="Comma-separated training seeds (init and data order)."),
    batch: int = typer.Option(8),
    seq: int = typer.Option(128),
    lr: float = typer.Option(2e-2),
    vocab: int = typer.Option(700, help="BPE vocabulary trained on all rows' documents."),
    threads: int = typer.Option(1, help="torch intra-op threads."),
    set_: list[str] = typer.Option(None, "--set", help="Model-config override key=value (repeatable)."),
) -> None:
    """K2 Table 1 in miniature: raw x N epochs vs 1 rephrasing x N vs N rephrasings x 1, equal tokens."""
    from openk2.cli.rephrase import open_rephraser
    from openk2.data.rephrase.experiment import ROW_LABELS, ROWS, run_rephrasing_experiment

    _threads(threads)
    rephraser = open_rephraser(model, model_name=model_name, api_key_env="OPENAI_API_KEY", concurrency=8,
                               cache_dir=out / "cache", max_retries=3, timeout=600.0, device="auto")
    rec = run_rephrasing_experiment(out, rephraser, n=n, people=people, seeds=tuple(int(s) for s in seeds.split(",")),
                                    batch=batch, seq=seq, lr=lr, vocab=vocab, style=style,
                                    model_overrides=_overrides(set_), log=_log)
    for row in ROWS:
        cells = ", ".join(f"{k} {100 * sum(v) / len(v):.1f}% ({'/'.join(f'{100 * x:.0f}' for x in v)})"
                          for k, v in rec["summary"][row].items())
        console.print(f"{ROW_LABELS[row].format(n=n)}: {cells}")
    console.print(f"wrote {out / 'rephrasing.json'} and {out / 'rephrasing.png'} ({rec['seconds']:.0f}s)")
