"""Midtraining (data.midtrain_*): chat rows enter the pretraining stream at the configured steps and weight, hold no
held-out person or evaluation task, and keep resume exact."""

import json
import os
import subprocess
import sys

import pytest
import torch

from openk2.data.chat import render_chat
from openk2.data.loader import PackedLoader
from openk2.data.world import World
from openk2.eval.benchmarks.world_agent import WorldAgent
from openk2.parallel.dist_checkpoint import read_extra
from openk2.rl.envs.facts import split_people
from openk2.train.checkpoint import latest_checkpoint
from openk2.train.config import TrainConfigError, load_config
from openk2.train.data_setup import prepare_data
from openk2.train.metrics import read_metrics
from openk2.train.midtrain import MidtrainLoader, chat_rows_at, midtrain_records

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "train.batch_size=4",
        "train.seq_len=64", "train.max_steps=6", "train.checkpoint_every=3", "train.eval_every=0",
        "train.warmup_steps=1", "run.progress=false", "run.tensorboard=false",
        "data.midtrain_world_requests=40", "data.midtrain_facts_copies=1"]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"run.dir='{tmp_path / 'run'}'", f"data.cache_dir='{tmp_path / 'cache'}'",
                              *extra])


def test_chat_rows_follow_start_and_weight_exactly():
    rows = [chat_rows_at(s, 252, 0.25, 16) for s in range(360)]
    assert rows[:252] == [0] * 252 and set(rows[252:]) == {4}
    tenth = [chat_rows_at(s, 10, 0.1, 16) for s in range(10, 110)]
    assert sum(tenth) == 160 and set(tenth) == {1, 2}  # 1.6 rows a step on average, no float drift
    assert chat_rows_at(400, 0, 0.0, 16) == 0


def test_loader_is_the_pretraining_stream_before_start_and_mixes_chat_after(tmp_path):
    cfg = _cfg(tmp_path, "data.midtrain_weight=0.5", "data.midtrain_start=0.5")
    data = prepare_data(cfg)
    mixed = data.loader
    assert isinstance(mixed, MidtrainLoader) and mixed.start_step == 3
    plain = PackedLoader(data.shards_dir, 4, 64, seed=0)
    chat_opener = data.tokenizer.special_id("<|im_system|>")
    for step in range(6):
        x_BT, y_BT = mixed.next_batch()
        assert x_BT.shape == (4, 64) and y_BT.shape == (4, 64)  # equal tokens per step
        if step < 3:
            px_BT, py_BT = plain.next_batch()
            assert torch.equal(x_BT, px_BT) and torch.equal(y_BT, py_BT)
        else:  # two pretraining rows (the stream advances by two), then two chat rows
            px_BT, py_BT = plain.next_batch(n_rows=2)
            assert torch.equal(x_BT[:2], px_BT) and torch.equal(y_BT[:2], py_BT)
            assert (x_BT[2:, 0] == chat_opener).all() and (x_BT[:2, 0] == data.tokenizer.bos_id).all()
            assert (y_BT[2:] == -100).any() and (y_BT[2:] != -100).any()  # loss on assistant tokens only
    assert mixed.stats()["chat_rows"] == 6


def test_rank_slices_make_up_the_global_batch_and_resume_is_exact(tmp_path):
    cfg = _cfg(tmp_path, "data.midtrain_weight=0.25", "data.midtrain_start=0.0")
    full, ranks = prepare_data(cfg).loader, [prepare_data(cfg).loader for _ in range(2)]
    for _ in range(3):
        x_BT, _ = full.next_batch()
        parts = [r.next_batch(slice(2 * k, 2 * k + 2))[0] for k, r in enumerate(ranks)]
        assert torch.equal(x_BT, torch.cat(parts))
    state = json.loads(json.dumps(full.state_dict()))  # JSON-able
    resumed = prepare_data(cfg).loader
    resumed.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(full.next_batch()[0], resumed.next_batch()[0])
    other = prepare_data(_cfg(tmp_path, "data.midtrain_weight=0.5", "data.midtrain_start=0.0")).loader
    with pytest.raises(ValueError, match="schedule changed"):
        other.load_state_dict(state)


def test_a_plain_checkpoint_state_resumes_into_midtraining(tmp_path):
    plain_cfg = _cfg(tmp_path)
    plain = prepare_data(plain_cfg).loader
    for _ in range(2):
        plain.next_batch()
    mixed = prepare_data(_cfg(tmp_path, "data.midtrain_weight=0.25", "data.midtrain_start=0.5")).loader
    mixed.load_state_dict(plain.state_dict())
    assert mixed.batches == 2
    assert torch.equal(mixed.next_batch()[0], plain.next_batch()[0])  # step 2 < start 3: the plain stream
    x_BT, _ = mixed.next_batch()
    assert torch.equal(x_BT[:3], plain.next_batch(n_rows=3)[0])


def test_records_hold_no_heldout_person_or_evaluation_task():
    world = World.generate(seed=0, n_people=100)
    records = midtrain_records(world, 0.5, world_requests=200, facts_copies=1)
    texts = [render_chat(r["messages"]) for r in records]
    assert all('"properties"' not in t for t in texts)  # no tool declarations: a dialog fits a pretraining row
    assert sum("functions.lookup" in t for t in texts) > 50  # tool calls to learn from
    heldout = [p.name for p in world.heldout_people]
    assert not any(name in t for t in texts for name in heldout)
    eval_prompts = [s.messages[-1]["content"] for s in WorldAgent(world_seed=0, world_people=100).load(None, 80)]
    assert not any(p in t for t in texts for p in eval_prompts)
    facts_held = split_people(world, 0.5)["heldout"]  # the RL stage's held-out facts people
    facts = [t for t, r in zip(texts, records, strict=True) if r["metadata"].get("source") == "facts"]
    assert len(facts) == 270 and not any(name in t for t in facts for name in facts_held)


def test_copy_documents_join_the_pool_as_plain_text_trained_on_every_token(tmp_path):
    world = World.generate(seed=0, n_people=100)
    records = midtrain_records(world, 0.5, world_requests=0, facts_copies=0, copy_documents=50)
    assert len(records) == 50 and all("text" in r and "messages" not in r for r in records)
    assert not any(p.name in r["text"] for r in records for p in world.people)
    cfg = _cfg(tmp_path, "data.midtrain_weight=0.5", "data.midtrain_start=0.5", "data.midtrain_world_requests=0",
               "data.midtrain_facts_copies=0", "data.midtrain_copy_documents=50")
    data = prepare_data(cfg)
    for _ in range(4):
        x_BT, y_BT = data.loader.next_batch()
    assert (x_BT[2:, 0] == data.tokenizer.bos_id).all()  # a copy document opens each mixed row
    assert (y_BT[2:] != -100).all()  # every token trained on (rows packed full of documents)
    text = data.tokenizer.decode(x_BT[2:].flatten().tolist())
    assert any(opener in text for opener in ("Request:", "Visitor log.", "In the square,", "Roster:"))


def test_repeat_rows_join_the_pool_with_their_second_half_equal_to_the_first(tmp_path):
    cfg = _cfg(tmp_path, "data.midtrain_weight=0.5", "data.midtrain_start=0", "data.midtrain_world_requests=0",
               "data.midtrain_facts_copies=0", "data.midtrain_repeat_rows=30")
    data = prepare_data(cfg)
    first_special = min(data.tokenizer.special_ids.values())
    for _ in range(3):
        x_BT, y_BT = data.loader.next_batch()
        half = cfg.train.seq_len // 2
        rows_x, rows_y = x_BT[2:], y_BT[2:]  # the mixed rows: the last half of the batch, one repeat row each
        assert (rows_x[:, 0] == data.tokenizer.bos_id).all()
        assert torch.equal(rows_x[:, 1:half], rows_y[:, half:-1])  # the repeat predicts the first half again
        assert (rows_y[:, :half] == -100).all() and (rows_y[:, half:] != -100).all()
        assert int(rows_x[:, 1:].max()) < first_special


def test_bad_knobs_are_config_errors():
    for bad in ("data.midtrain_weight=1.5", "data.midtrain_start=1.0", "data.midtrain_facts_copies=-1",
                "data.midtrain_copy_documents=-1", "data.midtrain_repeat_rows=-1"):
        with pytest.raises(TrainConfigError, match="midtrain"):
            load_config(None, [bad])
    with pytest.raises(TrainConfigError, match="needs data"):
        load_config(None, ["data.midtrain_weight=0.2", "data.midtrain_world_requests=0",
                           "data.midtrain_facts_copies=0"])
    with pytest.raises(TrainConfigError, match="even train.seq_len"):
        load_config(None, ["data.midtrain_repeat_rows=10", "train.seq_len=255"])


def test_pretrain_cli_midtrains_and_resumes_after_a_kill(tmp_path):
    def run(name, env=None):
        args = [sys.executable, "-m", "openk2", "pretrain"]
        for o in [*TINY, f"run.dir='{tmp_path / name}'", f"data.cache_dir='{tmp_path / 'cache'}'",
                  "data.midtrain_weight=0.5", "data.midtrain_start=0.3"]:
            args += ["--set", o]
        return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})

    assert run("ref").returncode == 0
    assert read_extra(latest_checkpoint(tmp_path / "ref"))["loader"]["format"] == "openk2.midtrain_loader/1"
    assert run("killed", {"OPENK2_FAULT_KILL_AT_STEP": "5"}).returncode == -9
    proc = run("killed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    losses = [[(r["step"], r["loss"]) for r in read_metrics(tmp_path / n / "metrics.jsonl")] for n in ("ref", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
