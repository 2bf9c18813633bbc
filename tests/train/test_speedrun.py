import json

from openk2.train.speedrun import speedrun

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "data.world_renderings=5",
        "data.world_qa_fraction=0.5", "train.batch_size=2", "train.seq_len=64", "train.max_steps=6",
        "train.checkpoint_every=6", "train.eval_every=3", "train.eval_batches=2", "train.warmup_steps=2",
        "run.progress=false", "run.tensorboard=false"]


def test_speedrun_writes_report_plots_and_probe_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = speedrun("smoke", overrides=[*TINY, f"data.cache_dir='{tmp_path / 'cache'}'"], sft=False)
    run = tmp_path / "runs" / "smoke"
    assert report.resolve() == run / "report.md"
    text = report.read_text()
    for row in ("| steps | 6 |", "validation loss, held-out documents (training styles)",
                "validation loss, held-out styles (same people)", "probe accuracy, recall phrasing",
                "probe accuracy, held-out people (chance level)", "![training.png](training.png)"):
        assert row in text, row
    assert (run / "training.png").stat().st_size > 10_000
    summary = json.loads((run / "summary.json").read_text())
    assert {"val_loss", "val_loss/world", "val_loss/world-val"} <= set(summary["final_eval"])
    assert {"seen/recall", "seen/qa", "unseen"} <= set(summary["probes"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "probe/seen/recall" in r] == [3, 6]  # probed at every validation
    assert all(0.0 <= v <= 1.0 for v in summary["probes"].values())
    assert summary["config"]["data"]["world_qa_fraction"] == 0.5


def test_speedrun_again_on_a_finished_run_reports_the_training_it_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [*TINY, "train.max_steps=3", f"data.cache_dir='{tmp_path / 'cache'}'"]
    speedrun("again", overrides=overrides, sft=False)
    first = json.loads((tmp_path / "runs" / "again" / "summary.json").read_text())["last_step"]
    speedrun("again", overrides=overrides, sft=False)  # resumes at max_steps: trains nothing, reports again
    second = json.loads((tmp_path / "runs" / "again" / "summary.json").read_text())["last_step"]
    assert second["step"] == 3 and second["tokens"] == first["tokens"] > 0 and second["loss"] == first["loss"]
