"""Typed training configuration loaded from TOML, with dotted `--set key=value` overrides.

Every key is a dataclass field; an unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class TrainConfigError(ValueError):
    """An invalid training configuration or override."""


@dataclass
class ModelSection:
    preset: str = "nano"
    # Any ModelConfig field, e.g. {num_hidden_layers = 4}. vocab_size follows the tokenizer unless set here.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    # [{path = "...", weight = 1.0, kind = "auto", text_field = "text"}]; empty = the embedded world corpus.
    sources: list[dict[str, Any]] = field(default_factory=list)
    tokenizer: str = ""  # a tokenizer directory; empty = train one on the data (cached)
    vocab_size: int = 1536  # when training the tokenizer (the default world supports ~1.8k merges)
    val_fraction: float = 0.02
    on_error: str = "fail"  # corrupt JSONL lines: "fail" or "skip"
    world_seed: int = 0
    world_people: int = 100
    world_renderings: int = 20  # training biographies per person, cycling through the world's styles
    world_qa_fraction: float = 0.5  # fraction of people with Q/A documents too (teaches answering questions)
    # K2-chat-rendered tool-use dialogs (tool declarations, calls, results) added to the *tokenizer's* training
    # text only, never to the LM's: a tokenizer trained on prose alone has no merges for JSON, and the world
    # domain's tool declarations cost ~3x more tokens (openk2.agentic.world_sft.tokenizer_chat_texts). 0 = none.
    tokenizer_chat_dialogs: int = 20
    # Midtraining (openk2.train.midtrain): from step round(midtrain_start * train.max_steps) on, midtrain_weight of
    # every batch's rows are K2-chat conversations (world-domain expert dialogs about registry worlds' and training
    # people, and chat-form facts questions about the Q/A-document people) instead of pretraining text, at the same
    # tokens per step; 0.7 = the LR-decay phase. midtrain_weight = 0 switches it off. World embedded corpus only.
    midtrain_weight: float = 0.0
    midtrain_start: float = 0.7
    midtrain_world_requests: int = 960  # one-request dialogs in the chat pool (no tool declarations: see midtrain.py)
    midtrain_facts_copies: int = 2  # copies of the facts family's 270 train-split questions in the chat pool
    # plain-text copy documents in the pool (openk2.data.copy_text: fresh names that recur within a document, all
    # tokens trained on), which reward copying a name from the context; 0 = none
    midtrain_copy_documents: int = 0
    # repeated random-token rows in the pool (openk2.data.repeat_rows: bos, seq_len/2 random ids, the same ids
    # again, loss on the repeat), the purest signal for induction heads (copying a string from the context); 0 = none
    midtrain_repeat_rows: int = 0
    # The copy curriculum (openk2.train.copy_curriculum): phases [{until = STEP, share = S, ids = N, span = L}, ...]
    # with increasing `until`; before each phase's `until` step (0-based, exclusive) `share` of every batch's rows
    # are repeated random-token rows with ids from [0, N) (N = 0: every ordinary token; 256 = the byte tokens), at
    # the same tokens per step: span = 0 (default) one half repeated (a fixed copy offset), span = L segments of
    # length <= L with random gaps (varied offsets). Measured: neither forms a copy circuit usable for names within
    # the speedrun's steps, and the rows cost the world corpus (docs/experiments.md). Empty = none (the default).
    copy_schedule: list[dict[str, Any]] = field(default_factory=list)
    cache_dir: str = ""  # where tokenized shards and tokenizers are cached; empty = <run.dir>/../.cache


@dataclass
class TrainSection:
    max_steps: int = 360
    # The global batch: sequences per optimizer step on any layout (see openk2.train.batch_plan).
    batch_size: int = 16
    # Sequences per forward/backward on one data-parallel rank; 0 = batch_size / data-parallel ranks (no
    # gradient accumulation). Changing it (or the layout) keeps the losses: only memory and speed change.
    micro_batch_size: int = 0
    seq_len: int = 256
    lr: float = 2e-2
    warmup_steps: int = 20
    decay_fraction: float = 0.3  # the last fraction of max_steps decays to final_lr_fraction * lr
    decay_shape: str = "cosine"  # "cosine" (K2) or "linear"
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    optimizer: str = "muonclip"  # "muonclip" or "adamw"
    qk_clip_tau: float = 100.0  # <= 0 disables QK-Clip
    momentum: float = 0.95
    seed: int = 0
    eval_every: int = 90
    eval_batches: int = 8
    log_every: int = 1
    checkpoint_every: int = 180
    keep_last: int = 2
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "auto"  # "auto" (fp32 on CPU, bf16 on CUDA) | "float32" | "bfloat16"
    deterministic: bool = True


@dataclass
class InitSection:
    # Start from another run's checkpoint (weights only) with this config's schedule, seq_len and RoPE/YaRN.
    from_checkpoint: str = ""
    # Applied to the model config when starting from a checkpoint, e.g. YaRN for long context.
    rope_scaling: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelSection:
    """Parallel layout and activation memory (openk2.parallel; docs/scaling.md). The defaults are one process."""

    dp_replicate: int = 1  # HSDP replicas
    dp_shard: int = -1  # FSDP degree; -1 = the ranks left after pp and dp_replicate
    ep: int = 1  # expert parallelism, borrowed from dp_shard (must divide it and the routed experts)
    pp: int = 1  # pipeline stages (ranks)
    pp_schedule: str = "1f1b"  # "1f1b" | "interleaved_1f1b"
    pp_virtual_stages: int = 1  # stages per pp rank (interleaved 1F1B)
    pp_layers: list[int] = field(default_factory=list)  # decoder layers per stage; empty = even split
    microbatches: int = 0  # pipeline micro-batches per batch; 0 = one per stage
    recompute: str = "none"  # "none" | "selective" (K2: norms, SwiGLU, MLA up-proj) | "selective+moe_down"
    fp8_activations: bool = False  # store MoE up-projection and SwiGLU inputs in FP8 (e4m3, 1x128 tiles)
    offload_activations: bool = False  # keep the remaining saved activations in host memory (CUDA only)


@dataclass
class SFTSection:
    """Supervised fine-tuning on chat JSONL (`openk2 sft`, `openk2.train.sft_data`). Empty `train_files` = pretraining.

    Each line: {"messages": [...OpenAI chat messages...], "tools": [...OpenAI tool schemas...]} ("tools"
    optional); rendered with the starting checkpoint's chat format, loss on assistant tokens only, conversations
    packed into `train.seq_len` rows. Bad lines fail or are skipped by `data.on_error`, reported as file:line.
    """

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)  # empty: hold out val_fraction of the training conversations
    val_fraction: float = 0.05
    # a conversation longer than a row: "truncate" (keep its start), "skip", or "split" at user turns into pieces
    # that each repeat the system prompt and tools and hold as many whole requests as fit (sft_data.split_requests)
    too_long: str = "truncate"


@dataclass
class RunSection:
    dir: str = "runs/nano"
    tensorboard: bool = True
    progress: bool = True
    force: bool = False  # resume even if the stored config differs


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    init: InitSection = field(default_factory=InitSection)
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    sft: SFTSection = field(default_factory=SFTSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        for section, values in d.items():
            if section not in _SECTIONS:
                raise TrainConfigError(f"unknown section [{section}]; valid sections: {', '.join(_SECTIONS)}")
            if not isinstance(values, dict):
                raise TrainConfigError(f"[{section}] must be a table, got {values!r}")
            for key, value in values.items():
                _assign(cfg, f"{section}.{key}", value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        t = self.train
        checks = [
            (t.max_steps > 0, "train.max_steps must be > 0"),
            (t.batch_size > 0 and t.seq_len > 1, "train.batch_size and train.seq_len must be > 0"),
            (0 <= t.micro_batch_size <= t.batch_size, "train.micro_batch_size must lie in [0, train.batch_size]"),
            (t.optimizer in ("muonclip", "adamw"), f"train.optimizer must be muonclip or adamw, got {t.optimizer!r}"),
            (t.decay_shape in ("cosine", "linear"), f"train.decay_shape must be cosine or linear: {t.decay_shape!r}"),
            (0 <= t.decay_fraction <= 1, "train.decay_fraction must lie in [0, 1]"),
            (t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}"),
            (t.dtype in ("auto", "float32", "bfloat16"), f"train.dtype must be auto, float32 or bfloat16: {t.dtype!r}"),
            (self.data.on_error in ("fail", "skip"), "data.on_error must be fail or skip"),
            (self.data.tokenizer_chat_dialogs >= 0, "data.tokenizer_chat_dialogs must be >= 0"),
            (0 <= self.data.midtrain_weight <= 1, "data.midtrain_weight must lie in [0, 1]"),
            (0 <= self.data.midtrain_start < 1, "data.midtrain_start must lie in [0, 1)"),
            (min(self.data.midtrain_world_requests, self.data.midtrain_facts_copies,
                 self.data.midtrain_copy_documents, self.data.midtrain_repeat_rows) >= 0,
             "data.midtrain_world_requests, data.midtrain_facts_copies, data.midtrain_copy_documents and "
             "data.midtrain_repeat_rows must be >= 0"),
            (self.data.midtrain_weight == 0 or self.data.midtrain_world_requests + self.data.midtrain_facts_copies
             + self.data.midtrain_copy_documents + self.data.midtrain_repeat_rows > 0,
             "data.midtrain_weight > 0 needs data: data.midtrain_world_requests, data.midtrain_facts_copies, "
             "data.midtrain_copy_documents or data.midtrain_repeat_rows"),
            (self.data.midtrain_repeat_rows == 0 or t.seq_len % 2 == 0,
             f"data.midtrain_repeat_rows needs an even train.seq_len (bos + two equal halves), got {t.seq_len}"),
            (not self.data.copy_schedule or t.seq_len % 2 == 0,
             f"data.copy_schedule needs an even train.seq_len (bos + two equal halves), got {t.seq_len}"),
            (t.keep_last >= 1, "train.keep_last must be >= 1"),
            (self.sft.too_long in ("truncate", "skip", "split"), "sft.too_long must be truncate, skip or split"),
            (0 <= self.sft.val_fraction < 1, "sft.val_fraction must lie in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainConfigError(msg)
        from openk2.train.copy_curriculum import parse_copy_schedule

        try:
            parse_copy_schedule(self.data.copy_schedule)
        except ValueError as e:
            raise TrainConfigError(str(e)) from e
        from openk2.parallel.layout import LayoutError, ParallelLayout

        try:  # the world-size-independent checks; the rest run at launch (ParallelLayout.resolve)
            ParallelLayout.from_section(self.parallel).resolve(self._static_world_size())
        except LayoutError as e:
            raise TrainConfigError(str(e)) from e

    def _static_world_size(self) -> int:
        p = self.parallel
        return p.pp * p.dp_replicate * (p.dp_shard if p.dp_shard > 0 else max(p.ep, 1))


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
_REMOVED = {
    "train.grad_accum": "train.batch_size is now the global batch (sequences per optimizer step on any layout); "
                        "set it to the old batch_size x grad_accum x data-parallel ranks, and train.micro_batch_size "
                        "to the old batch_size to keep the memory per forward",
}


def valid_keys() -> list[str]:
    cfg = TrainConfig()
    return [f"{s}.{f.name}" for s in _SECTIONS for f in dataclasses.fields(getattr(cfg, s))]


def _assign(cfg: TrainConfig, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    target = getattr(cfg, section, None) if section in _SECTIONS else None
    if target is None or not key:
        raise TrainConfigError(f"unknown key {dotted!r}; valid keys: {', '.join(valid_keys())}")
    if key.startswith("overrides.") and section == "model":  # model.overrides.num_hidden_layers=4
        target.overrides[key.split(".", 1)[1]] = value
        return
    fields = {f.name: f for f in dataclasses.fields(target)}
    if dotted in _REMOVED:
        raise TrainConfigError(f"{dotted} was removed: {_REMOVED[dotted]}")
    if key not in fields:
        raise TrainConfigError(f"unknown key {dotted!r}; valid keys: {', '.join(valid_keys())}")
    set_typed_field(target, key, value, dotted, TrainConfigError)


def set_typed_field(target: Any, key: str, value: Any, dotted: str, error: type[Exception]) -> None:
    """Set a config section's field, checked against the type of its default (ints widen to floats); shared by
    every typed config (`openk2.rl.config` too)."""
    default = getattr(type(target)(), key)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise error(f"{dotted} must be true or false, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(default) in (int, float, str, list, dict) and not isinstance(value, type(default)):
        raise error(f"{dotted} must be {type(default).__name__}, got {value!r}")
    setattr(target, key, value)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003); values are parsed as TOML, falling back to a bare string."""
    if "=" not in text:
        raise TrainConfigError(f"override {text!r} must look like key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise TrainConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise TrainConfigError(f"{p}: invalid TOML: {e}") from e
    cfg = TrainConfig.from_dict(data)
    for text in overrides:
        key, value = parse_override(text)
        _assign(cfg, key, value)
    cfg.validate()
    return cfg


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts (for refusing a mismatched resume)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict) and key != "overrides":
            out += diff_configs(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
