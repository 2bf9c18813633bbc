import json

from openk2.train.config import load_config
from openk2.train.sft_stage import report_lines, sft_stage
from openk2.train.trainer import Trainer

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "train.batch_size=2",
        "train.seq_len=64", "train.max_steps=1", "train.checkpoint_every=1", "train.eval_every=0",
        "train.warmup_steps=1", "run.progress=false", "run.tensorboard=false"]


def test_sft_stage_synthesizes_trains_and_measures(tmp_path):
    """The stage's plumbing on a tiny run: trajectories -> SFT run directory -> world-agent before and after."""
    run = tmp_path / "run"
    Trainer(load_config(None, [*TINY, f"run.dir='{run}'", f"data.cache_dir='{tmp_path / 'cache'}'"])).train()
    result = sft_stage(run, world_people=60, n_train=12, n_eval=3, progress=False, log=lambda s: None,
                       overrides=["train.max_steps=2", "train.batch_size=2", "train.seq_len=1536",
                                  "train.eval_every=2", "train.checkpoint_every=2", "train.warmup_steps=1"])
    lines = (run / "sft" / "data" / "train.jsonl").read_text().splitlines()
    assert result["n_train_tasks"] == 12  # two requests per dialog
    ptx = [json.loads(line) for line in lines if "text" in json.loads(line)]
    assert len(ptx) == result["n_ptx_documents"] > 0  # the PTX slice of pretraining documents
    assert len(lines) == result["n_train_trajectories"] + result["n_ptx_documents"]
    assert result["sft"]["steps"] == 2 and (run / "sft" / "tokenizer" / "tokenizer.json").is_file()
    for key in ("before", "after"):
        assert result[key]["n"] == 3 and 0.0 <= result[key]["success"] <= 1.0
    saved = json.loads((run / "sft_stage.json").read_text())
    assert saved["after"]["success"] == result["after"]["success"]
    assert (run / "sft_stage.png").stat().st_size > 5_000
    lines = "\n".join(report_lines(result))
    assert "world-agent success" in lines and "![sft stage](sft_stage.png)" in lines


def test_stage_settings_match_the_recipe():
    """recipes/sft-nano.toml documents the stage's built-in SFT settings: the two must not drift apart."""
    from dataclasses import asdict

    from openk2.train.sft_stage import SFT_OVERRIDES

    recipe, built_in = load_config("recipes/sft-nano.toml"), load_config(None, SFT_OVERRIDES)
    for section in ("data", "train", "sft", "init", "run"):
        assert asdict(getattr(recipe, section)) == asdict(getattr(built_in, section)), section
