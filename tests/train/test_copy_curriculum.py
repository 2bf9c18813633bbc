"""The copy curriculum (data.copy_schedule): repeat rows from a widening alphabet in pretraining's batches, at the
scheduled share and steps, resumable, composable with midtraining."""

import json

import pytest
import torch

from openk2.data.loader import PackedLoader
from openk2.train.config import TrainConfigError, load_config
from openk2.train.copy_curriculum import CopyCurriculumLoader, copy_rows_at, parse_copy_schedule
from openk2.train.data_setup import prepare_data
from openk2.train.midtrain import MidtrainLoader
from openk2.train.trainer import Trainer

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "train.batch_size=4",
        "train.seq_len=64", "train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=0",
        "train.warmup_steps=1", "run.progress=false", "run.tensorboard=false"]
# 2 steps: every row from a 256-id alphabet; 2 steps: half the rows over all ids; then none
SCHEDULE = "data.copy_schedule=[{until = 2, share = 1.0, ids = 256}, {until = 4, share = 0.5}]"


def _cfg(tmp_path, *extra, run="run"):
    return load_config(None, [*TINY, f"run.dir='{tmp_path / run}'", f"data.cache_dir='{tmp_path / 'cache'}'",
                              *extra])


def _check_repeat_rows(x_BT, y_BT, bos_id):
    half = x_BT.shape[1] // 2
    assert (x_BT[:, 0] == bos_id).all()
    assert torch.equal(x_BT[:, 1:half], y_BT[:, half:-1])  # the repeat predicts the first half again
    assert (y_BT[:, :half] == -100).all() and (y_BT[:, half:] != -100).all()  # loss on the repeat only


def test_rows_follow_the_phases_and_the_alphabet_switches_at_its_step(tmp_path):
    data = prepare_data(_cfg(tmp_path, SCHEDULE))
    loader, tok = data.loader, data.tokenizer
    assert isinstance(loader, CopyCurriculumLoader)
    first_special = min(tok.special_ids.values())
    plain = PackedLoader(data.shards_dir, 4, 64, seed=0)
    seen_high = []
    for step in range(6):
        x_BT, y_BT = loader.next_batch()
        assert x_BT.shape == (4, 64)  # equal tokens per step
        k = [4, 4, 2, 2, 0, 0][step]
        _check_repeat_rows(x_BT[4 - k:], y_BT[4 - k:], tok.bos_id)
        px_BT, py_BT = plain.next_batch(n_rows=4 - k)  # the pretraining stream advances by its rows only
        assert torch.equal(x_BT[:4 - k], px_BT) and torch.equal(y_BT[:4 - k], py_BT)
        if k:
            ids = x_BT[4 - k:, 1:]
            assert int(ids.max()) < (256 if step < 2 else first_special)
            seen_high.append(int(ids.max()))
    assert seen_high[2] >= 256  # after the switch, ids beyond the small alphabet (64 draws from ~650)
    assert loader.stats()["copy_rows"] == 12


def test_a_span_phase_gives_segment_rows_with_varied_offsets(tmp_path):
    data = prepare_data(_cfg(tmp_path, "data.copy_schedule=[{until = 2, share = 0.5, ids = 64, span = 8}]"))
    x_BT, y_BT = data.loader.next_batch()
    rows_x, rows_y = x_BT[2:], y_BT[2:]
    assert (rows_x[:, 0] == data.tokenizer.bos_id).all() and int(rows_x[:, 1:].max()) < 64
    masked = (rows_y != -100).sum(dim=1)
    assert (masked > 4).all() and (masked < 32).all()  # repeats with gaps, not one half repeated
    assert not torch.equal(rows_x[:, 1:32], rows_y[:, 32:-1])


def test_row_counts_are_exact_for_any_share():
    phases = parse_copy_schedule([{"until": 80, "share": 1.0, "ids": 256}, {"until": 360, "share": 0.1}])
    rows = [copy_rows_at(phases, s, 16) for s in range(400)]
    assert rows[:80] == [16] * 80 and rows[360:] == [0] * 40
    assert sum(rows[80:360]) == 448 and set(rows[80:360]) == {1, 2}  # 1.6 a step, no float drift


def test_resume_mid_schedule_gives_the_same_batches_and_ranks_make_up_the_batch(tmp_path):
    cfg = _cfg(tmp_path, SCHEDULE)
    full = prepare_data(cfg).loader
    ranks = [prepare_data(cfg).loader for _ in range(2)]
    for _ in range(3):  # through the switch at step 2
        x_BT, _ = full.next_batch()
        parts = [r.next_batch(slice(2 * k, 2 * k + 2))[0] for k, r in enumerate(ranks)]
        assert torch.equal(x_BT, torch.cat(parts))
    state = json.loads(json.dumps(full.state_dict()))  # JSON-able
    resumed = prepare_data(cfg).loader
    resumed.load_state_dict(state)
    for _ in range(3):
        a, b = full.next_batch(), resumed.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = prepare_data(_cfg(tmp_path, "data.copy_schedule=[{until = 2, share = 1.0}]")).loader
    with pytest.raises(ValueError, match="schedule changed"):
        other.load_state_dict(state)


def test_trainer_resumes_mid_schedule_with_the_losses_of_an_uninterrupted_run(tmp_path):
    whole = Trainer(_cfg(tmp_path, SCHEDULE, run="whole"))
    losses = [whole.train_step()["loss"] for _ in range(4)]
    first = Trainer(_cfg(tmp_path, SCHEDULE, run="split"))
    for _ in range(3):
        first.train_step()
    first.save()
    second = Trainer(_cfg(tmp_path, SCHEDULE, run="split"))
    assert second.step == 3 and second.data.loader.batches == 3
    assert second.train_step()["loss"] == pytest.approx(losses[3], abs=0, rel=0)


def test_composes_with_midtraining_chat_rows_last(tmp_path):
    cfg = _cfg(tmp_path, SCHEDULE, "data.midtrain_weight=0.25", "data.midtrain_start=0",
               "data.midtrain_world_requests=40", "data.midtrain_facts_copies=1")
    data = prepare_data(cfg)
    assert isinstance(data.loader, MidtrainLoader) and isinstance(data.loader.base, CopyCurriculumLoader)
    for step in range(4):
        x_BT, y_BT = data.loader.next_batch()
        assert x_BT.shape == (4, 64) and x_BT[3, 0] != data.tokenizer.bos_id  # one chat row, last
        k = 3 if step < 2 else 2  # the repeat rows fill what the chat row leaves (4 capped at 3)
        _check_repeat_rows(x_BT[3 - k:3], y_BT[3 - k:3], data.tokenizer.bos_id)


def test_bad_schedules_are_config_errors_and_the_alphabet_is_checked_against_the_tokenizer(tmp_path):
    bad = {"[{share = 0.5}]": "must be a table", "[{until = 5, share = 0.5, size = 3}]": "must be a table",
           "[{until = 5, share = 1.5}]": "share must lie", "[{until = 0, share = 0.5}]": "until must be",
           "[{until = 5, share = 0.5}, {until = 5, share = 0.2}]": "until must be",
           "[{until = 5, share = 0.5, ids = -3}]": "ids must be", "[1, 2]": "must be a table",
           "[{until = 5, share = 0.5, span = 1}]": "span must be"}
    for schedule, match in bad.items():
        with pytest.raises(TrainConfigError, match=match):
            load_config(None, [f"data.copy_schedule={schedule}"])
    with pytest.raises(TrainConfigError, match="even train.seq_len"):
        load_config(None, ["data.copy_schedule=[{until = 5, share = 0.5}]", "train.seq_len=255"])
    with pytest.raises(TrainConfigError, match="ordinary tokens"):
        prepare_data(_cfg(tmp_path, "data.copy_schedule=[{until = 5, share = 0.5, ids = 5000}]"))


def test_openk2_pretrain_takes_the_schedule_on_the_command_line(tmp_path):
    import subprocess
    import sys

    from openk2.parallel.dist_checkpoint import read_extra
    from openk2.train.checkpoint import latest_checkpoint

    run = tmp_path / "cli"
    args = [sys.executable, "-m", "openk2", "pretrain"]
    for o in [*TINY, "train.max_steps=4", "train.checkpoint_every=4", f"run.dir='{run}'",
              f"data.cache_dir='{tmp_path / 'cache'}'", SCHEDULE]:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = read_extra(latest_checkpoint(run))["loader"]
    assert state["format"] == "openk2.copy_curriculum_loader/1" and state["batches"] == 4
    assert state["phases"] == [{"until": 2, "share": 1.0, "ids": 256, "span": 0},
                               {"until": 4, "share": 0.5, "ids": 0, "span": 0}]
    bad = subprocess.run([*args[:4], "--set", "data.copy_schedule=[{until = 5, share = 2.0}]"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "data.copy_schedule[0].share must lie in [0, 1]" in bad.stderr + bad.stdout
