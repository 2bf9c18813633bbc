import json
import os

import pytest

from openk2.utils.io import atomic_write_json, atomic_write_text


def test_atomic_write_replaces_content_with_the_permissions_open_gives(tmp_path):
    (tmp_path / "plain.txt").write_text("x")  # what a plain open() creates under this umask
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert os.stat(target).st_mode == os.stat(tmp_path / "plain.txt").st_mode
    atomic_write_json(tmp_path / "b.json", {"k": 1}, sort_keys=True)
    assert json.loads((tmp_path / "b.json").read_text()) == {"k": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "plain.txt"]  # no temporaries left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # type: ignore[arg-type]
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
