"""Hugging Face checkpoint commands: `export-hf` and `import-hf`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from openk2.cli.app import app, console, fail

if TYPE_CHECKING:
    from openk2.model import K2Model

_DTYPES = ("bf16", "fp32")


def resolve_model_source(path: str | Path) -> K2Model:
    """Load the model that `path` names: a HF checkpoint directory or a training run directory (its latest
    checkpoint). The one place to add other sources."""
    from openk2.model.hf import CONFIG_NAME, CheckpointError, load_hf
    from openk2.train.checkpoint import latest_checkpoint, load_model_from_run

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / CONFIG_NAME).is_file():
        return load_hf(path)
    if latest_checkpoint(path) is not None:
        return load_model_from_run(path)
    raise CheckpointError(
        f"{path}: not a model source (expected a HF checkpoint directory with {CONFIG_NAME}, "
        "or a training run directory with checkpoints/step_*)"
    )


def tokenizer_dir_of(path: str | Path) -> Path | None:
    """Where the tokenizer of a model source lives: the HF directory itself or `<run>/tokenizer`."""
    from openk2.model_dir import tokenizer_dir_of as find

    return find(path)


# What a checkpoint's tokenizer and chat format consist of; export-hf copies them as they are, so a third-party
# template or tiktoken.model survives the export.
TOKENIZER_FILES = ("tokenizer.json", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def _summary(model: K2Model) -> str:
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    moe = len(model.moe_layers())
    return (
        f"{n_params:,} parameters, {dtype}, {cfg.num_hidden_layers} layers "
        f"({cfg.num_hidden_layers - moe} dense, {moe} MoE with {cfg.n_routed_experts} experts, "
        f"top-{cfg.num_experts_per_tok})"
    )


@app.command("export-hf")
def export_hf(
    src: Path = typer.Argument(..., help="Model source: a HF checkpoint directory or a training run directory."),
    dst: Path = typer.Argument(..., help="Output directory (config.json + safetensors shards)."),
    dtype: str = typer.Option(None, "--dtype", help="Weight dtype: bf16 or fp32 (default: the source's)."),
    max_shard_gb: float = typer.Option(5.0, "--max-shard-gb", help="Largest shard size in GiB."),
) -> None:
    """Write a model as a Hugging Face DeepseekV3ForCausalLM checkpoint (loads in transformers, vLLM, SGLang)."""
    import torch

    from openk2.model import CheckpointError, ConfigError, save_hf

    if dtype is not None and dtype not in _DTYPES:
        fail(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[dtype]
    try:
        model = resolve_model_source(src)
        out = save_hf(model, dst, dtype=torch_dtype, max_shard_bytes=int(max_shard_gb * 2**30))
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        fail(str(e))
    tok_dir = tokenizer_dir_of(src)
    if tok_dir is not None and tok_dir.resolve() != Path(out).resolve():
        import shutil

        for file in TOKENIZER_FILES:  # serving and chat read the tokenizer next to the weights
            if (tok_dir / file).is_file():
                shutil.copy2(tok_dir / file, Path(out) / file)
    console.print(f"exported {_summary(model)}" + (" with its tokenizer" if tok_dir else ""))
    console.print(f"to {out}" + (f" as {dtype}" if dtype else ""))


@app.command("import-hf")
def import_hf(
    hf_dir: Path = typer.Argument(..., help="A Hugging Face DeepseekV3 / Kimi K2 checkpoint directory."),
    dst: Path = typer.Argument(..., help="Output directory in openk2's checkpoint layout."),
) -> None:
    """Validate a Hugging Face checkpoint by loading it, and save it in openk2's layout (today the HF layout)."""
    from openk2.model import CheckpointError, ConfigError, load_hf, save_hf

    try:
        model = load_hf(hf_dir)
        console.print(f"loaded {hf_dir}: {_summary(model)}")
        out = save_hf(model, dst)
    except (CheckpointError, ConfigError) as e:
        fail(str(e))
    console.print(f"saved to {out}")
