"""Append-only JSONL result files that survive interruption and resume.

Long evaluations write one JSON line per finished unit of work, flushed and
fsynced at once, so Ctrl-C (or a crash) loses at most the unit in flight.
Rerunning the same command reads the file, skips the units already done and
appends the rest. A truncated last line (a kill mid-write) is dropped on resume.

    with ResultsFile("results.jsonl", key=("problem_id", "method", "budget")) as out:
        for job in jobs:
            if out.done(job): continue
            out.write({**job, "correct": ...})
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


class ResultsFile:
    def __init__(self, path: str | Path, key: Iterable[str]) -> None:
        self.path = Path(path)
        self.key = tuple(key)
        self.rows: list[dict[str, Any]] = []
        self._done: set[tuple] = set()
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def _load(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")
        good: list[str] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i >= len(lines) - 2:  # only the last line may be cut off by an interruption
                    break
                raise ValueError(f"{self.path}: line {i + 1} is not valid JSON; fix or remove it") from None
            self.rows.append(row)
            self._done.add(self._key(row))
            good.append(line)
        rewritten = "".join(line + "\n" for line in good)
        if rewritten != text:
            self.path.write_text(rewritten)

    def _key(self, row: dict[str, Any]) -> tuple:
        try:
            return tuple(row[k] for k in self.key)
        except KeyError as e:
            raise ValueError(f"result row lacks the key field {e}; every row needs {self.key}") from None

    def done(self, job: dict[str, Any]) -> bool:
        return self._key(job) in self._done

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a")
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.rows.append(row)
        self._done.add(self._key(row))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
