import json
import logging
import os

import pytest

from openk2.data.sources import (
    ReadStats,
    SourceError,
    SourceSpec,
    TextListSource,
    describe_source,
    iter_documents,
    resolve_files,
    source_fingerprint,
)


def write_jsonl(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_text_directory_recursive_sorted(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second dir", encoding="utf-8")
    (tmp_path / "a" / "deep" / "z.md").write_text("# deep markdown", encoding="utf-8")
    (tmp_path / "a" / "x.txt").write_text("first", encoding="utf-8")
    (tmp_path / "a" / "notes.csv").write_text("ignored,format", encoding="utf-8")
    (tmp_path / ".hidden" / "h.txt").write_text("hidden", encoding="utf-8")
    (tmp_path / "top.txt").write_text("top level\n", encoding="utf-8")
    docs = list(iter_documents(SourceSpec(tmp_path)))
    assert docs == ["# deep markdown", "first", "second dir", "top level\n"]
    files = resolve_files(SourceSpec(tmp_path, kind="text"))
    assert [f.name for f, _ in files] == ["z.md", "x.txt", "2.txt", "top.txt"]
    with pytest.raises(SourceError, match="no files with extension .jsonl"):
        resolve_files(SourceSpec(tmp_path, kind="jsonl"))


def test_jsonl_text_field_and_blank_lines(tmp_path) -> None:
    f = tmp_path / "d.jsonl"
    write_jsonl(f, [json.dumps({"body": "one", "id": 1}), "", json.dumps({"body": "two"}), "   "])
    assert list(iter_documents(SourceSpec(f, text_field="body"))) == ["one", "two"]


def test_jsonl_corrupt_line_fails_with_file_and_line(tmp_path) -> None:
    f = tmp_path / "bad.jsonl"
    write_jsonl(f, ['{"text": "ok"}', '{"text": "also ok"}', '{"text": "broken', '{"text": "after"}'])
    with pytest.raises(SourceError, match=rf"{f}:3: invalid JSON"):
        list(iter_documents(SourceSpec(f)))
    write_jsonl(f, ['{"text": "ok"}', '{"other": 1}'])
    with pytest.raises(SourceError, match=rf"{f}:2: no field 'text' \(fields: other\)"):
        list(iter_documents(SourceSpec(f)))
    write_jsonl(f, ['["not", "an", "object"]'])
    with pytest.raises(SourceError, match=rf"{f}:1: expected a JSON object"):
        list(iter_documents(SourceSpec(f)))
    write_jsonl(f, ['{"text": 3}'])
    with pytest.raises(SourceError, match=rf"{f}:1: field 'text' is int"):
        list(iter_documents(SourceSpec(f)))


def test_jsonl_skip_mode_counts_and_warns(tmp_path, caplog) -> None:
    f = tmp_path / "mixed.jsonl"
    write_jsonl(f, ['{"text": "a"}', "{oops", '{"text": ""}', '{"x": 1}', '{"text": "b"}', "[1]"])
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="openk2.data.sources"):
        docs = list(iter_documents(SourceSpec(f), on_error="skip", stats=stats))
    assert docs == ["a", "b"]
    assert (stats.documents, stats.skipped, stats.empty, stats.files) == (2, 3, 1, 1)
    assert stats.skipped_examples[0].startswith(f"{f}:2: invalid JSON")
    assert f"{f}: skipped 3 corrupt record(s)" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        list(iter_documents(SourceSpec(f), on_error="ignore"))


def test_missing_empty_and_unreadable_files(tmp_path) -> None:
    with pytest.raises(SourceError, match=rf"{tmp_path / 'nope.jsonl'}: no such file"):
        list(iter_documents(SourceSpec(tmp_path / "nope.jsonl")))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SourceError, match=rf"{empty}: file is empty"):
        list(iter_documents(SourceSpec(empty)))
    blank = tmp_path / "blank.md"
    blank.write_text("  \n\n")
    with pytest.raises(SourceError, match=rf"{blank}: file is empty"):
        list(iter_documents(SourceSpec(blank)))
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    with pytest.raises(SourceError, match=rf"{empty_jsonl}: file is empty"):
        list(iter_documents(SourceSpec(empty_jsonl)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SourceError, match=rf"{latin1}: not valid UTF-8"):
        list(iter_documents(SourceSpec(latin1)))
    only_blank_lines = tmp_path / "blank.jsonl"
    only_blank_lines.write_text("\n\n")
    with pytest.raises(SourceError, match="source has no documents"):
        list(iter_documents(SourceSpec(only_blank_lines)))
    weird = tmp_path / "data.bin"
    weird.write_text("x")
    with pytest.raises(SourceError, match=rf"{weird}: cannot tell the format"):
        list(iter_documents(SourceSpec(weird)))
    assert list(iter_documents(SourceSpec(weird, kind="text"))) == ["x"]
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    with pytest.raises(SourceError, match=rf"{empty_dir}: directory contains no files"):
        list(iter_documents(SourceSpec(empty_dir)))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_permission_denied(tmp_path) -> None:
    f = tmp_path / "secret.txt"
    f.write_text("hidden")
    f.chmod(0)
    with pytest.raises(SourceError, match=rf"{f}: cannot open"):
        list(iter_documents(SourceSpec(f)))


def test_parquet_round_trip(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"document number {i} " * (i % 5 + 1) for i in range(25)]
    f = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": texts, "id": list(range(25))}), f, row_group_size=7)
    assert pq.ParquetFile(f).num_row_groups == 4
    assert list(iter_documents(SourceSpec(f, text_field="content"))) == texts
    with pytest.raises(SourceError, match=rf"{f}: no column 'text' \(columns: content, id\)"):
        list(iter_documents(SourceSpec(f)))
    with pytest.raises(SourceError, match=rf"{f}: column 'id' has type int64, not string"):
        list(iter_documents(SourceSpec(f, text_field="id")))

    with_null = tmp_path / "null.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), with_null)
    with pytest.raises(SourceError, match=rf"{with_null}:row 1: null 'text'"):
        list(iter_documents(SourceSpec(with_null)))
    assert list(iter_documents(SourceSpec(with_null), on_error="skip")) == ["a", "c"]

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet at all")
    with pytest.raises(SourceError, match=rf"{broken}: unreadable parquet"):
        list(iter_documents(SourceSpec(broken)))


def test_mixed_directory_auto_kinds(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("plain")
    write_jsonl(tmp_path / "b.jsonl", ['{"text": "json one"}', '{"text": "json two"}'])
    stats = ReadStats()
    assert list(iter_documents(SourceSpec(tmp_path), stats=stats)) == ["plain", "json one", "json two"]
    assert stats.files == 2


def test_text_list_source() -> None:
    stats = ReadStats()
    assert list(iter_documents(TextListSource("mem", ["x", "", "y"]), stats=stats)) == ["x", "y"]
    assert stats.empty == 1
    with pytest.raises(SourceError, match="mem: source has no documents"):
        list(iter_documents(TextListSource("mem", [])))
    with pytest.raises(SourceError, match=r"mem\[1\]: document is int"):
        list(iter_documents(TextListSource("mem", ["x", 3])))  # type: ignore[list-item]


def test_fingerprint_tracks_changes(tmp_path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("version one")
    spec = SourceSpec(tmp_path)
    fp = source_fingerprint(spec)
    assert source_fingerprint(spec) == fp
    f.write_text("version two, longer")
    assert source_fingerprint(spec) != fp
    assert source_fingerprint(SourceSpec(tmp_path, text_field="body")) != source_fingerprint(spec)
    a, b = TextListSource("m", ["ab", "c"]), TextListSource("m", ["a", "bc"])
    assert source_fingerprint(a) != source_fingerprint(b)  # length-prefixed, not just concatenated
    assert source_fingerprint(a) == source_fingerprint(TextListSource("other", ["ab", "c"], weight=5))


def test_spec_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="weight"):
        SourceSpec(tmp_path, weight=-1)
    with pytest.raises(ValueError, match="weight"):
        TextListSource("m", ["a"], weight=float("nan"))
    with pytest.raises(ValueError, match="kind"):
        SourceSpec(tmp_path, kind="csv")
    with pytest.raises(ValueError, match="split"):
        SourceSpec(tmp_path, split="test")
    d = describe_source(SourceSpec(tmp_path, weight=2.0, name="web"))
    assert d["name"] == "web" and d["weight"] == 2.0 and d["type"] == "files"
