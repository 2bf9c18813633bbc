"""Shards and the packing loader.

Speed measured on the shared 2-core machine, default world corpus (7,280 docs, 2.28M chars; 556k tokens
with openk2's 2k-vocab tokenizer): in-process `encode_batch` 0.7 s (~0.8M tok/s); a spawn pool of 2
workers 1.2-1.3 s (0.5 s of it start-up), up to 5.9 s when the machine was busy; 1 worker 0.9 s. Hence
`num_workers=0` by default. Re-running on unchanged inputs: 5 ms. Packing: ~3.9M tok/s (B=32, T=512).
"""

import functools
import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from openk2.data import shards as shards_mod
from openk2.data.loader import IGNORE_INDEX, PackedLoader, ShardDataset, validation_batches
from openk2.data.shards import (
    TokenizerLike,
    build_shards,
    is_validation_doc,
    load_manifest,
    tokenizer_fingerprint,
)
from openk2.data.sources import SourceSpec, TextListSource
from openk2.data.world import World, world_documents


class StandInTokenizer:
    """Byte-level BPE from the `tokenizers` library, shaped like openk2's tokenizer (the test's stand-in)."""

    def __init__(self, tok: HFTokenizer) -> None:
        self._tok = tok
        self.bos_id = tok.token_to_id("<|bos|>")
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "StandInTokenizer":
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|bos|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "StandInTokenizer":
        return cls(HFTokenizer.from_file(path))

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class IdTokenizer:
    """Synthetic documents "k:L" encode to L copies of token k, so every token names its document."""

    def __init__(self, vocab_size: int = 4096) -> None:
        self.vocab_size = vocab_size
        self.bos_id = 0

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        out = []
        for t in texts:
            m = re.fullmatch(r"(\d+):(\d+)", t)
            # Any other text (the fingerprint probe) maps characters to ids.
            out.append([int(m[1])] * int(m[2]) if m else [ord(c) % (self.vocab_size - 1) + 1 for c in t])
        return out


def synthetic_docs(first_id: int, n: int, min_len: int, max_len: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{first_id + i}:{int(rng.integers(min_len, max_len + 1))}" for i in range(n)]


@pytest.fixture(scope="module")
def world_docs() -> list[str]:
    return world_documents(World.generate(seed=1, n_people=40), renderings_per_person=4)


@pytest.fixture(scope="module")
def bpe(world_docs: list[str]) -> StandInTokenizer:
    return StandInTokenizer.train(world_docs, vocab_size=600)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("synthetic")
    sources = [TextListSource("only", synthetic_docs(1, 300, 3, 90, seed=0))]
    build_shards(sources, out, IdTokenizer(), val_fraction=0.0, shard_tokens=2000, progress=False)
    return str(out)


def read_split(root, manifest: dict, source: int, split: str) -> list[np.ndarray]:
    docs = []
    for shard in manifest["sources"][source][split]["shards"]:
        tokens = np.load(root / shard["tokens"], mmap_mode="r")
        offsets = np.load(root / shard["offsets"])
        docs.extend(np.asarray(tokens[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1))
    return docs


# -------------------------------------------------------------------------------------------------------
# Shards


def test_protocol_and_fingerprint(bpe: StandInTokenizer) -> None:
    assert isinstance(bpe, TokenizerLike) and isinstance(IdTokenizer(), TokenizerLike)
    assert tokenizer_fingerprint(bpe) == tokenizer_fingerprint(bpe)
    other = StandInTokenizer.train(["completely different text"] * 20, vocab_size=300)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(bpe)


def test_shards_and_manifest(tmp_path, bpe: StandInTokenizer, world_docs: list[str]) -> None:
    val_only = ["To whom it may concern, a held-out letter.", "Fun facts: another held-out document."]
    sources = [TextListSource("world", world_docs, weight=2.0), TextListSource("letters", val_only, split="val")]
    manifest = build_shards(sources, tmp_path, bpe, val_fraction=0.05, shard_tokens=5000, progress=False)
    assert manifest == load_manifest(tmp_path) == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "openk2.shards/1" and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"] == {
        "fingerprint": tokenizer_fingerprint(bpe), "vocab_size": bpe.vocab_size, "bos_id": bpe.bos_id
    }  # fmt: skip
    world, letters = manifest["sources"]
    assert (world["name"], world["weight"], letters["weight"]) == ("world", 2.0, 1.0)
    assert len(world["train"]["shards"]) > 1  # shard_tokens forces several
    assert letters["train"]["documents"] == 0 and letters["val"]["documents"] == 2

    # Every document is BOS + its encoding, order kept within a split; the val split is the hash rule.
    expected_val = [d for d in world_docs if is_validation_doc(d, 0.05)]
    expected_train = [d for d in world_docs if not is_validation_doc(d, 0.05)]
    assert 0 < len(expected_val) < 0.15 * len(world_docs)
    for split, texts in (("train", expected_train), ("val", expected_val)):
        stored = read_split(tmp_path, manifest, 0, split)
        assert len(stored) == len(texts) == world[split]["documents"]
        for arr, ids in zip(stored, bpe.encode_batch(texts), strict=True):
            assert arr.dtype == np.uint16 and arr[0] == bpe.bos_id
            assert arr[1:].tolist() == ids
        assert sum(map(len, stored)) == world[split]["num_tokens"]
    assert bpe.decode(read_split(tmp_path, manifest, 1, "val")[0][1:].tolist()) == val_only[0]
    totals = manifest["totals"]
    assert totals["train_documents"] == len(expected_train)
    assert totals["val_documents"] == len(expected_val) + 2
    assert totals["train_num_tokens"] + totals["val_num_tokens"] == sum(
        s[split]["num_tokens"] for s in manifest["sources"] for split in ("train", "val")
    )


def test_val_max_docs_caps_in_source_order(tmp_path) -> None:
    docs = synthetic_docs(1, 200, 2, 5, seed=1)
    m = build_shards([TextListSource("s", docs)], tmp_path, IdTokenizer(), val_fraction=0.5, val_max_docs=7,
                     progress=False)  # fmt: skip
    val = read_split(tmp_path, m, 0, "val")
    assert [int(a[1]) for a in val] == [int(d.split(":")[0]) for d in docs if is_validation_doc(d, 0.5)][:7]


def test_rerun_reuses_and_crash_keeps_old_manifest(tmp_path, monkeypatch) -> None:
    sources = [
        TextListSource("a", synthetic_docs(1, 50, 2, 9, 0)),
        TextListSource("b", synthetic_docs(100, 50, 2, 9, 1)),
    ]
    first = build_shards(sources, tmp_path, IdTokenizer(), progress=False)
    files = sorted(p for p in tmp_path.rglob("*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    calls = []
    real_encode = shards_mod._encode_docs
    monkeypatch.setattr(shards_mod, "_encode_docs", lambda *a: calls.append(1) or real_encode(*a))
    assert build_shards(sources, tmp_path, IdTokenizer(), progress=False) == first
    assert calls == []  # nothing re-tokenized
    assert [p.stat().st_mtime_ns for p in files] == mtimes

    # Changing one source re-tokenizes only that one; weights alone change only the manifest.
    sources[1] = TextListSource("b", synthetic_docs(100, 60, 2, 9, 1), weight=3.0)
    calls.clear()
    second = build_shards(sources, tmp_path, IdTokenizer(), progress=False)
    assert len(calls) == 1 and second["sources"][0]["key"] == first["sources"][0]["key"]
    assert second["sources"][1]["train"]["documents"] + second["sources"][1]["val"]["documents"] == 60

    # A crash mid-build leaves the previous manifest, still pointing at complete shards.
    def boom(*a):
        raise RuntimeError("crash")

    monkeypatch.setattr(shards_mod, "_encode_docs", boom)
    sources[0] = TextListSource("a", synthetic_docs(1, 70, 2, 9, 0))
    with pytest.raises(RuntimeError):
        build_shards(sources, tmp_path, IdTokenizer(), progress=False)
    assert load_manifest(tmp_path) == second
    assert any(".tmp." in p.name for p in (tmp_path / "sources").iterdir())
    assert ShardDataset(tmp_path).num_docs(0) == second["sources"][0]["train"]["documents"]
    monkeypatch.setattr(shards_mod, "_encode_docs", real_encode)
    third = build_shards(sources, tmp_path, IdTokenizer(), progress=False)
    assert third["totals"]["train_documents"] + third["totals"]["val_documents"] == 130
    assert not any(".tmp." in p.name for p in (tmp_path / "sources").iterdir())


def test_uint32_for_large_vocab_and_range_check(tmp_path) -> None:
    m = build_shards([TextListSource("s", ["70000:3", "5:2"])], tmp_path, IdTokenizer(vocab_size=70001),
                     val_fraction=0.0, progress=False)  # fmt: skip
    assert m["dtype"] == "uint32"
    assert [a.tolist() for a in read_split(tmp_path, m, 0, "train")] == [[0, 70000, 70000, 70000], [0, 5, 5]]
    with pytest.raises(ValueError, match="out of range"):
        build_shards([TextListSource("s", ["5000:1"])], tmp_path / "x", IdTokenizer(vocab_size=100), progress=False)


def test_worker_pool_matches_in_process(tmp_path, bpe: StandInTokenizer, world_docs: list[str]) -> None:
    path = tmp_path / "tok.json"
    bpe._tok.save(str(path))
    factory = functools.partial(StandInTokenizer.load, str(path))
    src = [TextListSource("world", world_docs[:300])]
    a = build_shards(src, tmp_path / "a", bpe, progress=False)
    b = build_shards(src, tmp_path / "b", tokenizer_factory=factory, num_workers=1, batch_docs=64, progress=False)
    assert a["sources"][0]["key"] == b["sources"][0]["key"]
    for split in ("train", "val"):
        for x, y in zip(read_split(tmp_path / "a", a, 0, split), read_split(tmp_path / "b", b, 0, split), strict=True):
            assert np.array_equal(x, y)
    with pytest.raises(ValueError, match="tokenizer_factory"):
        build_shards(src, tmp_path / "c", bpe, num_workers=2)


def test_file_source_errors_surface(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "3:4"}\nnot json\n')
    with pytest.raises(ValueError, match=rf"{bad}:2: invalid JSON"):
        build_shards([SourceSpec(bad)], tmp_path / "out", IdTokenizer(), progress=False)
    m = build_shards([SourceSpec(bad)], tmp_path / "o", IdTokenizer(), on_error="skip", val_fraction=0, progress=False)
    assert m["sources"][0]["read"]["skipped"] == 1 and m["totals"]["train_documents"] == 1


# -------------------------------------------------------------------------------------------------------
# Loader


def segments(row: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(row == 0).tolist() + [len(row)]
    return [row[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def rows_of(batches) -> np.ndarray:
    out = []
    for inputs_BT, targets_BT in batches:
        assert inputs_BT.dtype == targets_BT.dtype == torch.int64
        assert torch.equal(inputs_BT[:, 1:], targets_BT[:, :-1])
        out.append(torch.cat([inputs_BT, targets_BT[:, -1:]], dim=1).numpy())
    return np.concatenate(out)


def test_packing_is_bos_aligned_and_accounts_for_every_token(synthetic_dir: str) -> None:
    ds = ShardDataset(synthetic_dir)
    lengths = {int(ds.tokens(0, i)[1]): int(ds.lengths(0)[i]) for i in range(ds.num_docs(0))}
    loader = PackedLoader(ds, batch_size=4, seq_len=63, buffer_size=16, seed=3)
    rows = rows_of(next(loader) for _ in range(10))
    assert rows.shape == (40, 64) and (rows[:, 0] == 0).all()
    used, bos_only_crops, cropped = [], 0, 0
    for row in rows:
        segs = segments(row)
        for j, seg in enumerate(segs):
            if len(seg) == 1:  # a 1-token crop keeps only the BOS, which cannot name its document
                bos_only_crops += 1
                continue
            k = int(seg[1])
            assert (seg[1:] == k).all()  # one document per segment, never spliced
            assert len(seg) <= lengths[k]
            if len(seg) < lengths[k]:
                assert j == len(segs) - 1  # only the document at the end of a row is cropped
                cropped += lengths[k] - len(seg)
            used.append(k)
    stats = loader.stats()
    assert stats["tokens"] == rows.size and stats["utilization"] == 1.0
    assert stats["documents"] == len(used) + bos_only_crops
    assert len(set(used)) == len(used)  # still in the first epoch: no document twice
    # Every document drawn from the stream so far was emitted (whole or with its crop reported) or is buffered.
    state = loader.state_dict()
    assert state["epoch"] == [0]
    order = np.random.default_rng([3, 0, 0]).permutation(ds.num_docs(0))[: state["cursor"][0]]
    drawn = {int(ds.tokens(0, int(i))[1]) for i in order}
    buffered = {int(ds.tokens(0, int(i))[1]) for i in state["buffer_doc"]}
    missing = drawn - set(used) - buffered
    assert len(missing) == bos_only_crops and not set(used) & buffered
    cropped += sum(lengths[k] - 1 for k in missing)
    assert stats["cropped_tokens"] == cropped
    assert 0 < stats["cropped_fraction"] < 0.5  # docs up to 1.4 rows long and a small buffer crop a lot


def test_deterministic_given_seed(synthetic_dir: str) -> None:
    def take(seed: int) -> np.ndarray:
        loader = PackedLoader(synthetic_dir, batch_size=2, seq_len=32, buffer_size=8, seed=seed)
        return rows_of(next(loader) for _ in range(5))

    assert np.array_equal(take(1), take(1))
    assert not np.array_equal(take(1), take(2))


def test_a_rank_share_of_the_global_batch_is_a_slice_of_it(synthetic_dir: str) -> None:
    """Data-parallel ranks read one global stream and copy only their rows (openk2.train.batch_plan)."""
    whole = PackedLoader(synthetic_dir, batch_size=6, seq_len=31, buffer_size=8, seed=5)
    shares = [PackedLoader(synthetic_dir, batch_size=6, seq_len=31, buffer_size=8, seed=5) for _ in range(3)]
    for _ in range(4):
        x, y = next(whole)
        for r, loader in enumerate(shares):
            xr, yr = loader.next_batch(slice(2 * r, 2 * r + 2))
            assert torch.equal(xr, x[2 * r:2 * r + 2]) and torch.equal(yr, y[2 * r:2 * r + 2])
    assert all(s.state_dict() == whole.state_dict() for s in shares)  # one stream: one resumable state
    with pytest.raises(ValueError, match="contiguous"):
        whole.next_batch(slice(0, 6, 2))


def test_ranks_read_disjoint_documents(synthetic_dir: str) -> None:
    docs = []
    for rank in range(2):
        loader = PackedLoader(synthetic_dir, batch_size=4, seq_len=63, rank=rank, world_size=2, buffer_size=8)
        rows = rows_of(next(loader) for _ in range(6))
        assert loader.state_dict()["epoch"] == [0]
        docs.append({int(s[1]) for r in rows for s in segments(r) if len(s) > 1})
        docs[-1] |= {int(ShardDataset(synthetic_dir).tokens(0, d)[1]) for d in loader.state_dict()["buffer_doc"]}
    assert docs[0] and docs[1] and not docs[0] & docs[1]
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(synthetic_dir, 1, 8, rank=2, world_size=2)


def test_resume_yields_identical_batches(tmp_path) -> None:
    sources = [TextListSource("big", synthetic_docs(1, 120, 3, 60, 0), weight=2.0),
               TextListSource("small", synthetic_docs(500, 15, 3, 40, 1), weight=1.0)]  # fmt: skip
    build_shards(sources, tmp_path, IdTokenizer(), val_fraction=0.0, progress=False)
    kwargs = dict(batch_size=3, seq_len=47, rank=1, world_size=2, seed=11, buffer_size=10)
    uninterrupted = PackedLoader(tmp_path, **kwargs)
    for _ in range(7):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # JSON-able and small
    assert len(json.dumps(state)) < 2000
    expected = [next(uninterrupted) for _ in range(25)]
    assert uninterrupted.stats()["epochs"]["small"] >= 2  # the resumed stretch crosses epoch boundaries

    resumed = PackedLoader(tmp_path, **kwargs)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(25)), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.stats() == uninterrupted.stats()

    with pytest.raises(ValueError, match="seed"):
        PackedLoader(tmp_path, **{**kwargs, "seed": 12}).load_state_dict(state)
    with pytest.raises(ValueError, match="weights"):
        PackedLoader(tmp_path, **kwargs, weights={"small": 5.0}).load_state_dict(state)


def test_mixture_weights_are_honoured(tmp_path) -> None:
    # Source a has short documents, b long ones: weights are shares of tokens, not of documents.
    sources = [TextListSource("a", synthetic_docs(1, 400, 2, 20, 0), weight=3.0),
               TextListSource("b", synthetic_docs(1000, 100, 30, 120, 1), weight=1.0)]  # fmt: skip
    build_shards(sources, tmp_path, IdTokenizer(), val_fraction=0.0, progress=False)
    loader = PackedLoader(tmp_path, batch_size=8, seq_len=127, buffer_size=32)
    rows = rows_of(next(loader) for _ in range(40))
    from_a = np.isin(rows, np.arange(1, 401)).sum()  # content tokens only: BOS belongs to both
    from_b = (rows >= 1000).sum()
    assert abs(from_a / (from_a + from_b) - 0.75) < 0.04
    assert abs(loader.stats()["source_share"]["a"] - 0.75) < 0.04
    # Overriding weights changes the mix.
    loader = PackedLoader(tmp_path, batch_size=8, seq_len=127, buffer_size=32, weights={"a": 1.0, "b": 1.0})
    rows = rows_of(next(loader) for _ in range(40))
    share_a = np.isin(rows, np.arange(1, 401)).sum() / (rows != 0).sum()
    assert abs(share_a - 0.5) < 0.05
    with pytest.raises(ValueError, match="unknown sources"):
        PackedLoader(tmp_path, 1, 8, weights={"c": 1.0})
    with pytest.raises(ValueError, match="no source"):
        PackedLoader(tmp_path, 1, 8, weights={"a": 0.0, "b": 0.0})


def test_validation_batches(tmp_path) -> None:
    docs = synthetic_docs(1, 200, 3, 50, 0) + ["999:80"]  # one document longer than a row
    sources = [TextListSource("s", docs)]
    build_shards(sources, tmp_path, IdTokenizer(), val_fraction=0.3, progress=False)
    ds = ShardDataset(tmp_path)
    val_ids = [int(ds.tokens(0, i, "val")[1]) for i in range(ds.num_docs(0, "val"))]
    val_len = {k: int(n) for k, n in zip(val_ids, ds.lengths(0, "val"), strict=True)}
    assert 30 < len(val_ids) < 90

    def collect(rank: int, world_size: int) -> tuple[list, int]:
        batches = list(validation_batches(ds, 4, 63, rank=rank, world_size=world_size, buffer_size=8))
        seen = []
        for inputs_BT, targets_BT in batches:
            assert inputs_BT.shape == targets_BT.shape == (4, 63)
            for x, y in zip(inputs_BT, targets_BT, strict=True):
                valid = y != IGNORE_INDEX
                n = int(valid.sum())
                if n == 0 and x[0] == 0 and (x == 0).all():
                    continue  # an all-padding row
                # Real tokens form a prefix of the row; padding inputs are BOS.
                assert valid[:n].all() and not valid[n:].any() and (x[n + 1 :] == 0).all()
                row = torch.cat([x[:1], y[:n]]).numpy()
                for seg in segments(row):
                    k = int(seg[1])
                    assert len(seg) == val_len[k] or (val_len[k] > 64 and len(seg) == 64)
                    seen.append(k)
        return seen, len(batches)

    seen, _ = collect(0, 1)
    assert sorted(seen) == sorted(val_ids)  # every validation document exactly once
    (s0, n0), (s1, n1) = collect(0, 2), collect(1, 2)
    assert n0 == n1 and not set(s0) & set(s1) and sorted(s0 + s1) == sorted(val_ids)
    first = list(validation_batches(ds, 4, 63, max_batches=2))
    full = list(validation_batches(ds, 4, 63))
    assert len(first) == 2 < len(full) and all(torch.equal(a[0], b[0]) for a, b in zip(first, full[:2], strict=True))


def test_world_end_to_end(tmp_path, bpe: StandInTokenizer, world_docs: list[str]) -> None:
    world = World.generate(seed=1, n_people=40)
    heldout_styles = world_documents(world, split="validation")
    sources = [TextListSource("world", world_docs), TextListSource("world-heldout-styles", heldout_styles, split="val")]
    build_shards(sources, tmp_path, bpe, progress=False)
    loader = PackedLoader(tmp_path, batch_size=2, seq_len=128)
    inputs_BT, targets_BT = next(loader)
    assert inputs_BT.shape == (2, 128) and (inputs_BT[:, 0] == bpe.bos_id).all()
    text = bpe.decode(inputs_BT[0, 1:].tolist())
    assert any(p.name in text for p in world.train_people)
    assert loader.stats()["source_share"] == {"world": 1.0}
    val = list(validation_batches(tmp_path, 2, 128, sources=["world-heldout-styles"]))
    text = "".join(bpe.decode(x[x != bpe.bos_id].tolist()) for inputs_BT, _ in val for x in inputs_BT)
    assert "To whom it may concern" in text and "Fun facts about" in text


def test_concurrent_builds_of_one_cache_all_succeed(tmp_path) -> None:
    """Two runs sharing a cache may tokenize the same source at once; both must end with the same complete build."""
    import subprocess
    import sys

    from openk2.data.tokenizer import train_tokenizer

    docs = world_documents(World.generate(seed=3, n_people=40), renderings_per_person=4)
    train_tokenizer(docs, 400, show_progress=False).save(tmp_path / "tok")
    script = (
        "import sys; from openk2.data.shards import build_shards; from openk2.data.sources import TextListSource;"
        "from openk2.data.tokenizer import Tokenizer; from openk2.data.world import World, world_documents;"
        "docs = world_documents(World.generate(seed=3, n_people=40), renderings_per_person=4);"
        f"tok = Tokenizer.load({str(tmp_path / 'tok')!r});"
        f"m = build_shards([TextListSource('w', docs)], {str(tmp_path / 'out')!r}, tok, progress=False);"
        "print(m['totals']['train_num_tokens'])"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert len({o for o, _ in outs}) == 1 and int(outs[0][0]) > 0
    assert not any(".tmp" in p.name for p in (tmp_path / "out" / "sources").iterdir())
    assert ShardDataset(tmp_path / "out").num_docs(0) > 0
