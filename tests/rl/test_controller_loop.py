"""The RL controller on a tiny digits model with the real in-process engine (TorchEngine): a whole step, metrics,
checkpoints and resume, partial rollouts across iterations, NaN losses skipped, failing rewards, bad config."""

from __future__ import annotations

import json

import pytest
import torch

from openk2.rl.config import RLConfigError, load_rl_config, valid_keys
from openk2.rl.controller import RLController

from .loop_helpers import tiny_digits_model_dir

BASE = ["tasks.digits_kinds=['reverse']", "tasks.digits_levels=[1]", "tasks.train_pool=40",
        "rollout.group_size=4", "rollout.prompts_per_step=4", "rollout.max_new_tokens={digits = 8}",
        "eval.n_heldout={default = 8}", "eval.every=0", "run.tensorboard=false", "run.progress=false", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return tiny_digits_model_dir(tmp_path_factory.mktemp("rl") / "tiny")


def config(tiny_dir, run_dir, *extra):
    return load_rl_config(None, [f"run.init='{tiny_dir}'", f"run.dir='{run_dir}'", *BASE, *extra])


def test_bad_config_keys_and_values():
    with pytest.raises(RLConfigError, match="unknown key 'train.lrr'; valid keys: .*train.lr"):
        load_rl_config(None, ["train.lrr=1"])
    with pytest.raises(RLConfigError, match="must be int"):
        load_rl_config(None, ["rollout.group_size='8'"])
    with pytest.raises(RLConfigError, match="policy loss|not registered"):
        load_rl_config(None, ["train.loss='nope'"])
    with pytest.raises(RLConfigError, match="group_size must be >= 2"):
        load_rl_config(None, ["rollout.group_size=1"])
    with pytest.raises(RLConfigError, match="unknown task family"):
        load_rl_config(None, ["tasks.mix={chess = 1.0}"])
    assert "train.ptx_coef" in valid_keys() and "rollout.segment_tokens" in valid_keys()


def test_controller_steps_checkpoint_and_resume(tiny_dir, tmp_path):
    run_dir = tmp_path / "rl"
    # partial rollouts: 4 tokens per iteration within a budget of 8, so every sample spans two iterations
    cfg = config(tiny_dir, run_dir, "train.steps=3", "run.checkpoint_every=1", "rollout.segment_tokens=4")
    c = RLController(cfg)
    first = c.rl_step()
    assert first["paused_samples"] > 0 and first["partial_groups"] > 0
    paused = {g.group_id for g in c.buffer}
    second = c.rl_step()
    # every group paused in step 1 finished in step 2 (4 + 4 tokens reach the budget) and was trained on
    assert not paused & {g.group_id for g in c.buffer} and second["groups_trained"] >= len(paused)
    for key in ("reward/mean", "reward/digits/reverse", "response_len", "truncation_rate", "zero_adv_groups",
                "time/rollout", "time/update", "time/sync", "temperature"):
        assert key in second, key
    c.save()
    buffered = [g.to_dict() for g in c.buffer]
    weights = {k: v.clone() for k, v in c.model.state_dict().items()}
    c.close()
    again = RLController(cfg)
    assert again.step == 2 and again.version == 2 and [g.to_dict() for g in again.buffer] == buffered
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in weights.items())
    summary = again.run()
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3]  # steps 1-2 ran outside run(); resume logs from the checkpoint on
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert "eval/digits/pass@1" in evals[0]
    from openk2.model_dir import load_model_dir

    loaded = load_model_dir(run_dir)  # the run directory is a model directory
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in again.model.state_dict().items())


def test_zero_advantage_groups_can_be_left_out_of_the_update(tiny_dir, tmp_path):
    from openk2.rl.controller import Group
    from openk2.rl.types import Trajectory

    def batch(drop: bool):
        c = RLController(config(tiny_dir, tmp_path / f"rl{drop}", "train.minibatches=2",
                                f"train.drop_zero_advantage_groups={str(drop).lower()}"))
        groups = []
        for gi, rewards in enumerate([(1.0, 0.0), (0.0, 0.0), (1.0, 1.0)]):
            trajs = [Trajectory(f"g{gi}", [1, 2], [3], [1], [-0.1], [0], reward=r, task_type="digits/reverse")
                     for r in rewards]
            groups.append(Group(f"g{gi}", "digits", gi, trajs))
        out = c._train_batch(groups)
        c.close()
        return out

    kept, adv, stats = batch(False)
    assert len(kept) == 6 and stats["zero_adv_groups"] == 2 / 3
    kept, adv, stats = batch(True)
    assert [t.group_id for t in kept] == ["g0", "g0"] and adv.tolist() == [0.5, -0.5]
    assert stats["zero_adv_groups"] == 2 / 3 and stats["pass_rate"] == 3 / 6


def test_nan_loss_skips_the_update(tiny_dir, tmp_path, monkeypatch):
    cfg = config(tiny_dir, tmp_path / "rl", "train.steps=1", "rollout.temperature=1.5")
    c = RLController(cfg)
    before = {k: v.clone() for k, v in c.model.state_dict().items()}

    def nan_loss(logp, old, adv, mask, lcfg):
        return (logp * float("nan")).sum(), {}

    c.updater.loss_fn = nan_loss
    c.updater.cfg.old_logprobs = "behaviour"  # every sample has a gradient, so the loss is computed
    record = c.rl_step()
    c.close()
    assert record.get("update/nan_skipped") == 1 and record["skipped_updates"] == 1
    assert all(torch.equal(v, c.model.state_dict()[k]) for k, v in before.items())


def test_a_raising_reward_fails_samples_and_the_run_goes_on(tiny_dir, tmp_path, monkeypatch):
    from openk2.rl.envs.procedural import DigitsEnv

    real_step = DigitsEnv.step

    async def flaky(self, action_text):
        if self.task.id.endswith(("1", "3", "5", "7", "9")):
            raise ValueError("checker crashed")
        return await real_step(self, action_text)

    monkeypatch.setattr(DigitsEnv, "step", flaky)
    cfg = config(tiny_dir, tmp_path / "rl", "train.steps=1")
    c = RLController(cfg)
    record = c.rl_step()
    c.close()
    assert record["failed_samples"] > 0 and record["step"] == 1


def test_speedrun_rl_stage_writes_results_plot_and_report(tiny_dir, tmp_path):
    import shutil

    from openk2.rl.envs.procedural import sft_records
    from openk2.train.rl_stage import report_lines, rl_stage, warm_start_records
    from openk2.train.sft_stage import write_jsonl

    shutil.copytree(tiny_dir, tmp_path / "sft")
    overrides = [*BASE, "train.steps=2", "tasks.mix={digits = 1.0}", "eval.families=['facts']",
                 "eval.n_heldout={default = 8}", "train.ptx_seq_len=64"]
    # the stage's PTX loss trains on the SFT stage's own data, which the SFT stage writes to <run>/sft/data
    with pytest.raises(RLConfigError, match="SFT stage's .*train.jsonl, which is missing"):
        rl_stage(tmp_path, progress=False, log=lambda *_: None, overrides=overrides)
    ptx_file = tmp_path / "sft" / "data" / "train.jsonl"
    write_jsonl(ptx_file, sft_records(16, seed=1, kinds=("reverse",), levels=(1,)))
    result = rl_stage(tmp_path, progress=False, log=lambda *_: None, overrides=overrides)
    assert result["steps"] == 2 and result["families"] == ["digits"] and result["n_heldout"] == {"facts": 8}
    assert result["ptx"]["files"] == [str(ptx_file)] and result["ptx"]["coef"] > 0
    assert all(m["ptx_loss"] > 0 for m in map(json.loads, (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()))
    assert {"eval/facts/pass@1"} <= result["before"].keys() & result["after"].keys()
    assert (tmp_path / "rl_stage.json").is_file() and (tmp_path / "rl_stage.png").is_file()
    assert (tmp_path / "rl" / "checkpoints").is_dir()
    lines = "\n".join(report_lines(result))
    assert "## RL stage" in lines and "| facts |" in lines and "`digits` tasks" in lines and "PTX loss" in lines
    assert "held-out tasks: `facts` questions about the other people" in lines and "(8 tasks)." in lines
    records = warm_start_records(n=5, per_person=False)
    assert len(records) == 5 and records[0]["messages"][-1]["role"] == "assistant"
    grouped = warm_start_records(n=5)  # the same 5 questions, one record per person
    assert sum(m["role"] == "assistant" for r in grouped for m in r["messages"]) == 5


def test_minibatches_anchor_later_steps_to_the_pre_update_policy(tiny_dir):
    """K1.5 is off-policy within an iteration: with 2 optimizer steps per batch, the second minibatch's Δ is
    measured against π_old recomputed before the first step (nonzero), not against the moved policy."""
    from openk2.model_dir import load_model_dir
    from openk2.rl.config import TrainSection
    from openk2.rl.types import Trajectory
    from openk2.rl.update import PolicyUpdater

    model = load_model_dir(tiny_dir).model
    trajs = [Trajectory(group_id="g", prompt_ids=[1, 2, 3], response_ids=[4 + i, 5], loss_mask=[1, 1],
                        behav_logprobs=[-1.0, -1.0], versions=[0, 0]) for i in range(4)]
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    one = PolicyUpdater(model, TrainSection(lr=1e-2, minibatches=1)).update(trajs, adv)
    assert one["update/delta_abs_mean"] == 0.0
    two = PolicyUpdater(model, TrainSection(lr=1e-2, minibatches=2)).update(trajs, adv)
    assert two["update/delta_abs_mean"] > 0.0


def test_ptx_loss_joins_the_update(tiny_dir, tmp_path):
    from openk2.rl.envs.procedural import sft_records
    from openk2.train.sft_stage import write_jsonl

    write_jsonl(tmp_path / "ptx.jsonl", sft_records(16, seed=1, kinds=("reverse",), levels=(1,)))
    ptx = ["train.ptx_coef=0.5", f"train.ptx_files=['{tmp_path / 'ptx.jsonl'}']", "train.ptx_batch=2",
           "train.ptx_seq_len=48", "train.steps=2"]
    c = RLController(config(tiny_dir, tmp_path / "rl", *ptx))
    record = c.rl_step()
    assert record["ptx_loss"] > 0
    c.save()
    saved = c.updater.ptx.state_dict()
    straight = c.rl_step()
    c.close()
    # a resumed run continues the PTX data where the checkpoint left it: the same step as without the stop
    resumed = RLController(config(tiny_dir, tmp_path / "rl", *ptx))
    assert (saved["epoch"], saved["cursor"]) != (0, 0)
    assert resumed.step == 1 and resumed.updater.ptx.state_dict() == saved
    again = resumed.rl_step()
    resumed.close()
    assert again["ptx_loss"] == pytest.approx(straight["ptx_loss"], rel=1e-5)
    assert again["update/loss"] == pytest.approx(straight["update/loss"], rel=1e-4, abs=1e-6)
    with pytest.raises(RLConfigError, match="ptx_files"):
        config(tiny_dir, tmp_path / "rl2", "train.ptx_coef=0.5")
    # without ptx_files the PTX data is the starting SFT run's own (<run.init>/data/train.jsonl)
    write_jsonl(tmp_path / "sft" / "data" / "train.jsonl", sft_records(4, seed=2, kinds=("reverse",), levels=(1,)))
    own = load_rl_config(None, [f"run.init='{tmp_path / 'sft'}'", "train.ptx_coef=0.5"])
    assert own.ptx_paths() == [str(tmp_path / "sft" / "data" / "train.jsonl")]


def test_ptx_rows_keep_the_answers_of_dialogs_longer_than_a_row(tiny_dir, tmp_path):
    """A two-request dialog longer than `train.ptx_seq_len` is split at its user turn, so each piece keeps the
    system prompt and its own answer (truncating would drop the second answer, or all of them when the prompt
    alone fills the row, as the world domain's does at 256 tokens)."""
    from openk2.model_dir import load_model_dir
    from openk2.rl.update import PTXData
    from openk2.train.sft_stage import write_jsonl

    fmt = load_model_dir(tiny_dir).chat_format
    system = {"role": "system", "content": "1 2 3 4 5 6 7 8 9 " * 6}
    turns = [{"role": "user", "content": "reverse 1 2 3"}, {"role": "assistant", "content": "3 2 1"},
             {"role": "user", "content": "reverse 4 5 6"}, {"role": "assistant", "content": "6 5 4"}]
    write_jsonl(tmp_path / "ptx.jsonl", [{"messages": [system, *turns]}] * 3)
    whole = len(fmt.render_ids_and_mask([system, *turns], None)[0])
    one_request = len(fmt.render_ids_and_mask([system, *turns[:2]], None)[0])
    assert one_request < whole
    ptx = PTXData.from_files([str(tmp_path / "ptx.jsonl")], fmt, batch_size=2, seq_len=one_request + 2)
    assert len(ptx.loader.convs) == 6  # each dialog in two pieces, both with an answer to learn
    assert all(c.mask[1:].sum() > 0 and len(c.ids) <= one_request + 3 for c in ptx.loader.convs)
    inputs_BT, targets_BT = ptx.next_batch()
    assert inputs_BT.shape == (2, one_request + 2) and (targets_BT != -100).sum() > 0
