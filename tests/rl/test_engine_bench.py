"""`bench/rl.py --metrics`: the RL step split of a run's metrics.jsonl, as a user runs it."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_step_split_of_a_metrics_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "time/rollout": 3.0, "time/reward": 1.0, "time/update": 4.0, "time/sync": 2.0,
             "time/wall_this_process": 12.0},
            {"step": 2, "eval/pass": 0.5},
            {"step": 3, "time/rollout": 5.0, "time/reward": 1.0, "time/update": 4.0, "time/sync": 0.0,
             "time/wall_this_process": 22.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rl.py"), "--metrics", str(metrics)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    # steps of 12 s and 10 s: rollout 8 of 22 s, sync 2 of 22, other (12 - 10) + (10 - 10) = 2
    assert "| rollout | 4.000 | 36% |" in out.stdout
    assert "| sync | 1.000 | 9% |" in out.stdout
    assert "| other | 1.000 | 9% |" in out.stdout
    assert "wall_this_process" not in out.stdout


def test_step_split_names_a_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench/rl.py", "--metrics", str(tmp_path / "none.jsonl")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "bench" / "rl.py"), run_name="__main__")
    assert exit_info.value.code == 2 and "openk2 rl" in capsys.readouterr().err
