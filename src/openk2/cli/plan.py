"""`openk2 plan`: per-GPU memory of a parallel layout, before renting the GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from openk2.cli.app import app, fail


@app.command()
def plan(
    preset: str = typer.Option(None, help="Model preset (default: the config's, else kimi-k2)."),
    config: Path = typer.Option(None, "--config", "-c", help="A TOML recipe: its model and [parallel] layout."),
    gpus: int = typer.Option(None, help="World size (default: the config layout's pp x dp_replicate x dp_shard)."),
    pp: int = typer.Option(None, help="Pipeline stages."),
    vp: int = typer.Option(None, help="Virtual stages per pipeline rank (interleaved 1F1B when > 1)."),
    ep: int = typer.Option(None, help="Expert parallelism (borrowed from dp_shard)."),
    dp_replicate: int = typer.Option(None, help="HSDP replicas."),
    dp_shard: int = typer.Option(None, help="FSDP degree (-1: fill)."),
    pp_layers: str = typer.Option(None, help="Layers per pipeline stage, e.g. 3,4,4,3 (default: even, else "
                                  "balanced with lighter first and last stages)."),
    seq_len: int = typer.Option(None, help="Tokens per sequence (default: the config's train.seq_len)."),
    micro_batch: int = typer.Option(1, help="Sequences per micro-batch."),
    recompute: str = typer.Option(None, help="none | selective | selective+moe_down"),
    fp8: bool = typer.Option(None, "--fp8/--no-fp8", help="FP8 activation storage."),
    offload: bool = typer.Option(None, "--offload/--no-offload", help="Activation offload to host memory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Estimate per-GPU parameter, gradient, optimizer and activation memory of a layout (docs/scaling.md)."""
    from openk2.model import ConfigError, get_preset
    from openk2.parallel.layout import LayoutError, ParallelLayout, balanced_pp_layers
    from openk2.parallel.plan import estimate, format_plan
    from openk2.train.config import TrainConfigError, load_config

    try:
        cfg = load_config(config) if config else None
        layout = ParallelLayout.from_section(cfg.parallel) if cfg else ParallelLayout()
        overrides = {k: v for k, v in (cfg.model.overrides if cfg else {}).items()}
        mcfg = get_preset(preset or (cfg.model.preset if cfg else "kimi-k2"), **overrides)
        changes = {k: v for k, v in dict(pp=pp, ep=ep, dp_replicate=dp_replicate, dp_shard=dp_shard,
                                          recompute=recompute, fp8_activations=fp8,
                                          offload_activations=offload).items() if v is not None}
        if vp is not None:
            changes.update(pp_virtual_stages=vp, pp_schedule="interleaved_1f1b" if vp > 1 else "1f1b")
        if pp_layers:
            changes["pp_layers"] = tuple(int(n) for n in pp_layers.split(","))
        from dataclasses import replace

        layout = replace(layout, **changes)
        n_stages = layout.pp * layout.pp_virtual_stages
        if layout.pp > 1 and not layout.pp_layers and mcfg.num_hidden_layers % n_stages:
            layout = replace(layout, pp_layers=balanced_pp_layers(mcfg.num_hidden_layers, n_stages))
            print(f"pp_layers = {list(layout.pp_layers)} (balanced: {n_stages} stages do not divide "
                  f"{mcfg.num_hidden_layers} layers)")
        world = gpus or layout.pp * layout.dp_replicate * max(layout.dp_shard, layout.ep)
        layout = layout.resolve(world)
        layout.validate_model(mcfg)
        seq = seq_len or (cfg.train.seq_len if cfg else 4096)
        p = estimate(mcfg, layout, seq_len=seq, micro_batch=micro_batch)
    except (ConfigError, LayoutError, TrainConfigError, FileNotFoundError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(p.as_dict(), indent=2))
    else:
        print(f"{mcfg.num_hidden_layers} layers, {mcfg.n_routed_experts} experts; {seq} tokens x {micro_batch} "
              "sequences per micro-batch")
        print(format_plan(p))
