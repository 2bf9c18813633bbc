"""From config to batches: sources (or the embedded world) -> tokenizer -> token shards -> packed loader.

Everything expensive is cached under `data.cache_dir` (default: `<run.dir>/../.cache`) by content keys, so a
second run, a resume or the speedrun reuses the tokenizer and shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openk2.data.loader import PackedLoader, validation_batches
from openk2.data.shards import build_shards, tokenizer_fingerprint
from openk2.data.sources import Source, SourceSpec, TextListSource, iter_documents, source_fingerprint
from openk2.data.tokenizer import Tokenizer, train_tokenizer
from openk2.data.world import World, world_documents
from openk2.train.config import TrainConfig, TrainConfigError
from openk2.train.copy_curriculum import CopyCurriculumLoader, parse_copy_schedule
from openk2.train.midtrain import MidtrainLoader, chat_conversations, midtrain_records


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    shards_dir: Path
    loader: PackedLoader | CopyCurriculumLoader | MidtrainLoader
    # Held-out batches of one source; `val_sources` lists the sources that have held-out documents.
    val_batches: Callable[[str], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    token_bytes: torch.Tensor  # UTF-8 bytes per token id, for bits per byte
    world: World | None = None
    val_sources: list[str] = field(default_factory=list)


def cache_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.run.dir).resolve().parent / ".cache"


def world_for(cfg: TrainConfig) -> World:
    return World.generate(seed=cfg.data.world_seed, n_people=cfg.data.world_people)


def build_sources(cfg: TrainConfig) -> tuple[list[Source], World | None]:
    if not cfg.data.sources:
        world = world_for(cfg)
        return [
            TextListSource("world", world_documents(world, "train", renderings_per_person=cfg.data.world_renderings,
                                                    qa_fraction=cfg.data.world_qa_fraction)),
            # Held-out biography styles of the same people: validation only.
            TextListSource("world-val", world_documents(world, "validation"), split="val"),
        ], world
    specs = []
    for i, s in enumerate(cfg.data.sources):
        if not isinstance(s, dict) or "path" not in s:
            raise TrainConfigError(f"data.sources[{i}] must be a table with a 'path', got {s!r}")
        try:
            specs.append(SourceSpec(**s))
        except TypeError as e:
            raise TrainConfigError(f"data.sources[{i}]: {e}") from e
    return specs, None


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def get_tokenizer(cfg: TrainConfig, sources: list[Source], progress: bool = True) -> Tokenizer:
    """The configured tokenizer directory, or one trained on the training sources (cached by content)."""
    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not (path / "tokenizer.json").is_file():
            raise TrainConfigError(f"data.tokenizer={path} has no tokenizer.json")
        return Tokenizer.load(path)
    train_sources = [s for s in sources if s.split != "val"]
    n_chat = cfg.data.tokenizer_chat_dialogs
    key = _key([source_fingerprint(s) for s in train_sources], cfg.data.vocab_size,
               *([f"chat-dialogs-{n_chat}-seed-{cfg.data.world_seed}-{cfg.data.world_people}"] if n_chat else []))
    path = cache_dir(cfg) / f"tokenizer-{cfg.data.vocab_size}-{key}"
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    texts = (doc for s in train_sources for doc in iter_documents(s, on_error=cfg.data.on_error))
    if n_chat:  # tokenizer-only text: the chat and tool-call format (see DataSection.tokenizer_chat_dialogs)
        from openk2.agentic.world_sft import tokenizer_chat_texts

        texts = itertools.chain(texts, tokenizer_chat_texts(world_for(cfg), n_chat))
    tokenizer = train_tokenizer(texts, cfg.data.vocab_size, show_progress=progress)
    tokenizer.save(path)
    return tokenizer


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Tokenizer, shards, the training stream and validation batches of the config. Both yield global batches
    (`train.batch_size` rows) in one layout-independent order; data-parallel ranks keep their rows of each
    (`openk2.train.batch_plan`)."""
    if cfg.sft.train_files:  # chat JSONL, assistant-only loss (the same trainer, another data source)
        from openk2.train.sft_data import prepare_sft_data

        return prepare_sft_data(cfg)
    t = cfg.train
    sources, world = build_sources(cfg)
    tokenizer = get_tokenizer(cfg, sources, progress=cfg.run.progress)
    key = _key(tokenizer_fingerprint(tokenizer), [source_fingerprint(s) for s in sources], cfg.data.val_fraction)
    shards_dir = cache_dir(cfg) / f"shards-{key}"
    build_shards(sources, shards_dir, tokenizer, val_fraction=cfg.data.val_fraction, on_error=cfg.data.on_error,
                 progress=cfg.run.progress)
    loader = PackedLoader(shards_dir, t.batch_size, t.seq_len, seed=t.seed)
    ds = loader.data
    if cfg.data.copy_schedule:
        loader = copy_curriculum_loader(cfg, loader, tokenizer)
    if cfg.data.midtrain_weight > 0:
        loader = midtrain_loader(cfg, loader, tokenizer, world)

    def val(source: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return validation_batches(shards_dir, t.batch_size, t.seq_len, sources=[source], max_batches=t.eval_batches)

    val_sources = [n for i, n in enumerate(ds.names) if ds.num_docs(i, "val") > 0]
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long)
    return PreparedData(tokenizer, shards_dir, loader, val, token_bytes, world, val_sources)


def copy_curriculum_loader(cfg: TrainConfig, loader: PackedLoader, tokenizer: Tokenizer) -> CopyCurriculumLoader:
    """The pretraining stream with the copy curriculum's repeat rows (`DataSection.copy_schedule`)."""
    try:
        return CopyCurriculumLoader(loader, parse_copy_schedule(cfg.data.copy_schedule), bos_id=tokenizer.bos_id,
                                    first_special=min(tokenizer.special_ids.values()), seed=cfg.train.seed)
    except ValueError as e:
        raise TrainConfigError(str(e)) from e


def midtrain_loader(cfg: TrainConfig, loader: PackedLoader | CopyCurriculumLoader, tokenizer: Tokenizer,
                    world: World | None) -> MidtrainLoader:
    """The pretraining stream with midtraining's chat rows (`DataSection.midtrain_*`, `openk2.train.midtrain`)."""
    if world is None:
        raise TrainConfigError("data.midtrain_weight > 0 needs the embedded world corpus (data.sources = []): its "
                               "chat data is about the world's people")
    d, t = cfg.data, cfg.train
    records = midtrain_records(world, d.world_qa_fraction, d.midtrain_world_requests, d.midtrain_facts_copies,
                               copy_documents=d.midtrain_copy_documents)
    convs, _ = chat_conversations(tokenizer, records, t.seq_len)
    if d.midtrain_repeat_rows:  # one row each: bos + two halves of seq_len / 2 = the row's seq_len + 1 tokens
        from openk2.data.repeat_rows import repeat_rows
        from openk2.train.sft_data import TokenizedConversation

        first_special = min(tokenizer.special_ids.values())
        convs += [TokenizedConversation(ids, mask, f"repeat:{i}") for i, (ids, mask) in enumerate(
            repeat_rows(d.midtrain_repeat_rows, t.seq_len // 2, first_special, tokenizer.bos_id, seed=t.seed))]
    return MidtrainLoader(loader, convs, start_step=int(round(d.midtrain_start * t.max_steps)),
                          weight=d.midtrain_weight, pad_id=tokenizer.pad_id, seed=t.seed)
