"""Repeated random-token rows (openk2.data.repeat_rows): each row's second half equals its first, only the repeat is
trained on, ids stay below the given bound, and the stream is deterministic in its seed."""

import numpy as np
import pytest
import torch

from openk2.data.repeat_rows import RepeatLoader, repeat_rows, rows_to_batch, span_row


def test_a_row_is_bos_then_a_random_half_repeated_with_loss_on_the_repeat_only():
    rows = repeat_rows(20, half=16, vocab_size=100, bos_id=101, seed=3, low=5)
    for ids, mask in rows:
        assert len(ids) == 33 and ids[0] == 101
        assert np.array_equal(ids[1:17], ids[17:])
        assert ids[1:].min() >= 5 and ids[1:].max() < 100
        assert mask[:17].sum() == 0 and mask[17:].all()
    assert len({ids[1:17].tobytes() for ids, _ in rows}) == 20  # fresh ids in every row
    again = repeat_rows(20, half=16, vocab_size=100, bos_id=101, seed=3, low=5)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(rows, again, strict=True))
    other = repeat_rows(20, half=16, vocab_size=100, bos_id=101, seed=4, low=5)
    assert not np.array_equal(rows[0][0], other[0][0])


def test_batches_shift_targets_and_ignore_the_first_half():
    x_BT, y_BT = rows_to_batch(repeat_rows(3, half=8, vocab_size=50, bos_id=60))
    assert x_BT.shape == y_BT.shape == (3, 16)
    assert (y_BT[:, :8] == -100).all()
    # target t is input t+1; the repeat's targets are the first half's inputs again
    assert torch.equal(y_BT[:, 8:15], x_BT[:, 9:16]) and torch.equal(y_BT[:, 8:], x_BT[:, 1:9])
    loader = RepeatLoader(4, 16, 50, 60, seed=1)
    xa, _ = loader.next_batch(slice(1, 3))
    assert xa.shape == (2, 16)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="half"):
        repeat_rows(2, half=0, vocab_size=10, bos_id=11)
    with pytest.raises(ValueError, match="even"):
        RepeatLoader(2, 15, 10, 11)


def test_induction_screen_bench_trains_on_repeat_rows_and_reports_the_repeat_loss(tmp_path):
    import json
    import math
    import os
    import subprocess
    import sys
    from pathlib import Path

    from openk2.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, 300, show_progress=False)
    tok.save(tmp_path / "tok")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "induction_screen.py"), "--tokenizer", str(tmp_path / "tok"),
         "--steps", "4", "--eval-every", "2", "--ids", "40", "--out", str(tmp_path / "run"),
         "--set", "model.preset=tiny", "--set", "train.seq_len=32", "--set", "train.batch_size=4",
         "--set", "train.optimizer=adamw", "--set", "train.lr=3e-3"],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    evals = [r for r in lines if "step" in r]
    assert [r["step"] for r in evals] == [2, 4]
    # an untrained model pays about ln(40) on ids drawn from 40 (well above 0, well below a wrong confident guess)
    assert all(1.0 < r["heldout_repeat_nats"] < 3 * math.log(300) for r in evals)
    assert "heldout_all_ids_repeat_nats" in evals[0]
    summary = lines[-1]
    assert summary["summary"] and summary["steps_run"] == 4 and summary["phase_change_step"] is None


def test_span_rows_repeat_segments_at_varied_offsets_with_loss_on_the_predictable_repeat_only():


    offsets = set()
    for seed in range(20):
        ids, mask = span_row(np.random.default_rng(seed), 129, 16, 0, 1000, 1500)
        assert len(ids) == len(mask) == 129 and ids[0] == 1500 and int(ids[1:].max()) < 1000 and mask[0] == 0
        assert 0 < mask.sum() < 64
        for i in np.flatnonzero(mask):  # a masked token's previous token and itself occurred together before
            prev = [j for j in range(1, i - 1) if ids[j] == ids[i - 1] and ids[j + 1] == ids[i]]
            assert prev, (seed, i)
            offsets.add(i - prev[-1] - 1)
    assert len(offsets) > 10  # no single distance: a fixed-offset head cannot predict them
    with pytest.raises(ValueError, match="span"):
        span_row(np.random.default_rng(0), 10, 1, 0, 5, 6)
