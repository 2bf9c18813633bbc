"""Hugging Face checkpoints: `DeepseekV3ForCausalLM` directories (config.json + safetensors).

On disk the routed experts are stored per expert, as in the released DeepSeek-V3 / Kimi K2 checkpoints
(`model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`); in memory openk2 keeps them as 3-D
tensors (`mlp.experts.{gate,up}_proj` [E, F, D], `mlp.experts.down_proj` [E, D, F]). Every other tensor has
the same name on disk and in memory. `load_hf` also accepts the fused in-memory layout of transformers 5
(`mlp.experts.gate_up_proj` [E, 2F, D] = cat(gate, up) on dim 1, `mlp.experts.down_proj` [E, D, F]).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from openk2.model.config import ConfigError, ModelConfig
from openk2.model.transformer import K2Model
from openk2.utils.io import fsync_path

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_PER_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_GATE_UP_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj$")
_EXPERTS_3D_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_ROUTER_BIAS_SUFFIX = "e_score_correction_bias"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# safetensors' dtype tags, as returned by `get_slice(name).get_dtype()`.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class CheckpointError(ValueError):
    """A missing, incomplete or inconsistent checkpoint; the message names the file and the tensor."""


# ====================================================================== save
@dataclass
class _Entry:
    """One on-disk tensor, produced lazily so that only one shard is materialized at a time."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def _hf_entries(model: K2Model, dtype: torch.dtype) -> Iterator[_Entry]:
    """The model's tensors under their HF names, routed experts split per expert."""
    skip_lm_head = model.config.tie_word_embeddings
    for name, t in model.state_dict().items():
        if skip_lm_head and name == "lm_head.weight":
            continue
        # HF keeps the selection bias in fp32 whatever the model dtype (`_keep_in_fp32_modules_strict`).
        out_dtype = torch.float32 if name.endswith(_ROUTER_BIAS_SUFFIX) else dtype
        if not t.is_floating_point():
            out_dtype = t.dtype
        m = _EXPERTS_3D_RE.match(name)
        if m is None:
            yield _Entry(name, tuple(t.shape), out_dtype, lambda t=t: t)
            continue
        prefix, proj = m.groups()
        for e in range(t.shape[0]):
            yield _Entry(f"{prefix}.{e}.{proj}.weight", tuple(t.shape[1:]), out_dtype, lambda t=t, e=e: t[e])


def _plan_shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    """Greedy packing in state-dict order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _materialize(entry: _Entry) -> torch.Tensor:
    # A fresh contiguous CPU copy: safetensors refuses tensors that share storage (per-expert views do).
    src = entry.source().detach()
    if src.is_meta:
        raise CheckpointError(f"cannot save tensor {entry.name!r}: it is on the meta device (not materialized)")
    return torch.empty(entry.shape, dtype=entry.dtype, device="cpu").copy_(src)


def _write_json(path: Path, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_hf(
    model: K2Model,
    directory: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `model` as a HF `DeepseekV3ForCausalLM` checkpoint and return the directory.

    `dtype` defaults to the dtype of the embedding; the router selection bias is always fp32. Files are
    `model-0000X-of-0000N.safetensors` plus `model.safetensors.index.json` (also for a single shard).
    The checkpoint is written into a temporary sibling directory first. A new `directory` appears by one
    rename; an existing one loses its index first and gets it back last, so an interrupted save leaves
    a directory that `load_hf` rejects, never a mix of old and new tensors. Other files there (a
    tokenizer, say) are kept.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory}: exists and is not a directory")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    dtype = dtype or model.model.embed_tokens.weight.dtype
    if dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"unsupported save dtype {dtype}; use one of {list(_DTYPE_NAMES.values())}")

    entries = list(_hf_entries(model, dtype))
    shards = _plan_shards(entries, max_shard_bytes)
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    config = model.config.to_hf_dict()
    # transformers 5 reads `dtype`; older readers (and vLLM) read `torch_dtype`.
    config.update(torch_dtype=_DTYPE_NAMES[dtype], dtype=_DTYPE_NAMES[dtype])
    index = {
        "metadata": {"total_size": sum(e.nbytes for e in entries)},
        "weight_map": {e.name: names[i] for i, shard in enumerate(shards) for e in shard},
    }

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename and hide the checkpoint from other users
    try:
        for shard_name, shard in zip(names, shards, strict=True):
            save_file({e.name: _materialize(e) for e in shard}, tmp / shard_name, metadata={"format": "pt"})
            fsync_path(tmp / shard_name)
        _write_json(tmp / CONFIG_NAME, config)
        _write_json(tmp / INDEX_NAME, index)
        fsync_path(tmp)
        _commit(tmp, directory, names)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _commit(tmp: Path, directory: Path, shard_names: list[str]) -> None:
    """Move the finished checkpoint in `tmp` to `directory` (see `save_hf` for the crash guarantees)."""
    if not directory.exists():
        os.rename(tmp, directory)
        fsync_path(directory.parent)
        return
    # The index (or a single-file checkpoint) is what makes a directory loadable: drop it first.
    for marker in (INDEX_NAME, SINGLE_FILE_NAME):
        (directory / marker).unlink(missing_ok=True)
    fsync_path(directory)
    for name in shard_names:
        os.replace(tmp / name, directory / name)
    for stale in directory.iterdir():
        if _SHARD_RE.match(stale.name) and stale.name not in shard_names:
            stale.unlink()
    os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)
    fsync_path(directory)
    os.replace(tmp / INDEX_NAME, directory / INDEX_NAME)
    fsync_path(directory)


# ====================================================================== load
def read_hf_config(directory: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a HF checkpoint directory; errors name the config file."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a HF checkpoint directory needs {CONFIG_NAME})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    try:
        return ModelConfig.from_hf_dict(d)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def _weight_files(directory: Path) -> tuple[list[Path], dict[str, Path]]:
    """(files to read, tensor name -> file per the index); the map is empty without an index."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
        by_name = {name: directory / file for name, file in weight_map.items()}
        files = sorted(set(by_name.values()))
        for f in files:
            if not f.is_file():
                example = next(n for n, p in by_name.items() if p == f)
                raise CheckpointError(
                    f"{index_path}: shard file {f.name} is missing (it should hold tensor {example!r} and "
                    f"{sum(p == f for p in by_name.values()) - 1} others)"
                )
        return files, by_name
    single = directory / SINGLE_FILE_NAME
    if single.is_file():
        return [single], {}
    raise CheckpointError(f"{directory}: no {INDEX_NAME} or {SINGLE_FILE_NAME} found")


def _checkpoint_dtype(files: list[Path], by_name: dict[str, Path]) -> torch.dtype:
    """The dtype the checkpoint's embedding is stored in (the router may be stored in fp32 regardless)."""
    name = "model.embed_tokens.weight"
    for path in [by_name[name]] if name in by_name else files:
        with safe_open(path, framework="pt") as f:
            names = f.keys()  # a safe_open handle is not a mapping
            if name in names:
                tag = f.get_slice(name).get_dtype()
                if tag not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tag}")
                return _SAFETENSORS_DTYPES[tag]
    raise CheckpointError(f"tensor {name!r} not found in {[p.name for p in files]}")


class _Assembler:
    """Collects checkpoint tensors into the state dict of a meta-device `K2Model`, checking every name and
    shape, and writing per-expert / fused expert tensors into preallocated 3-D tensors."""

    def __init__(self, model: K2Model, device: torch.device, dtype: torch.dtype) -> None:
        self.cfg = model.config
        self.device, self.dtype = device, dtype
        self.expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
        if self.cfg.tie_word_embeddings:
            self.expected.pop("lm_head.weight")
        self.tensors: dict[str, torch.Tensor] = {}
        self.experts_filled: dict[str, torch.Tensor] = {}  # 3-D name -> bool [E]
        self.source: dict[str, Path] = {}

    def _target_dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name.endswith(_ROUTER_BIAS_SUFFIX) else self.dtype

    def _check_shape(self, path: Path, name: str, expected: tuple[int, ...], got: tuple[int, ...]) -> None:
        if expected != got:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(got)}, expected {list(expected)} from {CONFIG_NAME}"
            )

    def _unexpected(self, path: Path, name: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: unexpected tensor {name!r} (not part of a {self.cfg.num_hidden_layers}-layer "
            f"DeepseekV3ForCausalLM with this {CONFIG_NAME})"
        )

    def ignored(self, name: str) -> bool:
        if "rotary_emb." in name:  # recomputed from the config
            return True
        m = _LAYER_RE.match(name)
        # Multi-token-prediction layers follow the decoder layers; openk2 does not train or run them.
        if m is not None and int(m.group(1)) >= self.cfg.num_hidden_layers:
            return True
        return self.cfg.tie_word_embeddings and name == "lm_head.weight"

    def _expert_buffer(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            shape, _ = self.expected[name]
            self.tensors[name] = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.experts_filled[name] = torch.zeros(shape[0], dtype=torch.bool)
        return self.tensors[name]

    def add(self, path: Path, name: str, get: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> None:
        if name.endswith("_scale_inv"):
            raise CheckpointError(
                f"{path}: tensor {name!r} is a block-FP8 scale; FP8 checkpoints are not supported, "
                "dequantize to bf16 first"
            )
        if (m := _PER_EXPERT_RE.match(name)) is not None:
            prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
            target = f"{prefix}.{proj}"
            if target not in self.expected or e >= self.expected[target][0][0]:
                raise self._unexpected(path, name)
            self._check_shape(path, name, self.expected[target][0][1:], shape)
            self._expert_buffer(target)[e].copy_(get())
            self.experts_filled[target][e] = True
            self.source[target] = path
            return
        if (m := _FUSED_GATE_UP_RE.match(name)) is not None:
            gate, up = f"{m.group(1)}.gate_proj", f"{m.group(1)}.up_proj"
            if gate not in self.expected:
                raise self._unexpected(path, name)
            E, Fd, D = self.expected[gate][0]
            self._check_shape(path, name, (E, 2 * Fd, D), shape)
            gate_up = get()
            for target, part in ((gate, gate_up[:, :Fd]), (up, gate_up[:, Fd:])):
                self._expert_buffer(target).copy_(part)
                self.experts_filled[target][:] = True
                self.source[target] = path
            return
        if name not in self.expected:
            raise self._unexpected(path, name)
        if name in self.tensors:
            raise CheckpointError(f"{path}: tensor {name!r} also appears in {self.source[name]}")
        self._check_shape(path, name, self.expected[name][0], shape)
        if _EXPERTS_3D_RE.match(name):  # openk2's own 3-D layout (or transformers 5's fused down_proj)
            self._expert_buffer(name).copy_(get())
            self.experts_filled[name][:] = True
        else:
            self.tensors[name] = get().to(device=self.device, dtype=self._target_dtype(name))
        self.source[name] = path

    def finish(self, files: list[Path], by_name: dict[str, Path]) -> dict[str, torch.Tensor]:
        missing = []
        for name in self.expected:
            if name not in self.tensors:
                missing.append(name)
            elif name in self.experts_filled and not bool(self.experts_filled[name].all()):
                prefix, proj = name.rsplit(".", 1)
                absent = (~self.experts_filled[name]).nonzero()[:, 0].tolist()
                missing += [f"{prefix}.{e}.{proj}.weight" for e in absent]
        if missing:
            shown = ", ".join(
                f"{n!r}" + (f" (the index puts it in {by_name[n].name})" if n in by_name else "") for n in missing[:5]
            )
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"missing tensor(s) {shown}{more}; read {', '.join(str(p) for p in files)}")
        if self.cfg.tie_word_embeddings:
            self.tensors["lm_head.weight"] = self.tensors["model.embed_tokens.weight"]
        return self.tensors


def load_hf(
    directory: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> K2Model:
    """Load a HF `DeepseekV3ForCausalLM` checkpoint (single file or sharded) into a `K2Model`.

    `dtype` defaults to the dtype the embedding is stored in; every floating tensor is cast to it except
    the fp32 router selection bias. MTP layers and rotary buffers in the checkpoint are ignored. The
    model is built on the meta device and its parameters are the loaded tensors (no second copy). It is
    returned in training mode, like `build_model`; call `.eval()` for inference.
    """
    directory = Path(directory)
    cfg = read_hf_config(directory)
    files, by_name = _weight_files(directory)
    device = torch.device(device)
    dtype = dtype or _checkpoint_dtype(files, by_name)

    with torch.device("meta"):
        model = K2Model(cfg)
    asm = _Assembler(model, device, dtype)
    for path in files:
        try:
            handle = safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
        with handle as f:
            names = f.keys()  # a safe_open handle is not a mapping
            for name in names:
                if asm.ignored(name):
                    continue
                tag = f.get_slice(name).get_dtype()
                if tag.startswith("F8"):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} is stored as {tag}; FP8 checkpoints are not supported, "
                        "dequantize to bf16 first"
                    )
                asm.add(path, name, lambda f=f, name=name: f.get_tensor(name), tuple(f.get_slice(name).get_shape()))
    state = asm.finish(files, by_name)

    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers are not in the state dict and are still on the meta device.
    for module in model.modules():
        for key, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                module._buffers[key] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    model.reset_buffers(keep_router_bias=True)
    return model


__all__ = ["CheckpointError", "load_hf", "read_hf_config", "save_hf"]
