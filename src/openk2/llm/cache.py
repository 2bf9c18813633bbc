"""On-disk response cache keyed by the full request, written atomically (safe to kill a run at any time).

Key: sha256 of `{"endpoint": ..., "request": payload}` as JSON with the payload's key order kept: the request
is exactly what was sent (tool declarations, for one, are rendered into the prompt in the order given). One
JSON file per entry, `<dir>/<key[:2]>/<key>.json`, holding the endpoint, request, response and time; a file
is written to a temporary name and renamed into place, so readers never see a partial entry. An unreadable
entry (e.g. from a disk error) is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from openk2.utils.io import atomic_write_text


def request_key(endpoint: str, payload: Mapping[str, Any]) -> str:
    blob = json.dumps({"endpoint": endpoint, "request": payload}, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get_record(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and "response" in record else None

    def get(self, key: str) -> dict[str, Any] | None:
        record = self.get_record(key)
        return None if record is None else record["response"]

    def put(self, key: str, endpoint: str, payload: Mapping[str, Any], response: Mapping[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"key": key, "endpoint": endpoint, "request": payload, "response": response,
                           "created": time.time()}, ensure_ascii=False)
        atomic_write_text(path, text)

    def __contains__(self, key: str) -> bool:
        return self.get_record(key) is not None

    def records(self) -> Iterator[dict[str, Any]]:
        """Every readable entry, in key order."""
        for path in sorted(self.directory.glob("*/*.json")):
            record = self.get_record(path.stem)
            if record is not None:
                yield record

    def __len__(self) -> int:
        return sum(1 for _ in self.records())

    def export_jsonl(self, path: str | os.PathLike) -> int:
        """Write every entry as one JSON line (a fixture for `ReplayBackend.from_jsonl`); returns the count."""
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            for record in self.records():
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        return n
