"""Math datasets in the formats people have: one loader, ``load_problems``.

    ds = load_problems("MATH-500/test.jsonl")          # or .json, a `datasets` folder, a hub id
    ds.records[0]   # Problem(id='test/algebra/1.json', problem='...', answer='\\frac{1}{2}', level=3, subject='Algebra')

Recognised, record by record:

- **MATH / MATH-500**: ``problem``; ``answer``, or else ``solution`` whose last
  ``\\boxed{}`` is the answer; ``level`` ("Level 3" -> 3), ``subject`` (or ``type``),
  ``unique_id``.
- **GSM8K**: ``question``; ``answer`` whose ``#### n`` ending is the answer (n, commas removed).
- **AIME-style**: ``problem`` / ``Problem``, ``answer`` / ``Answer``, ``id`` / ``ID``.

Sources: a JSONL file (one object per line), a JSON file (a list of objects, or an
object holding one under ``data`` / ``examples`` / ``rows`` / ``problems``), a local
Hugging Face ``datasets`` folder (``datasets.load_from_disk``; its ``test`` split when it
holds several), or a hub id (``owner/name``, when online). Errors name the file, the
line (JSONL) or record (JSON, folders, hub) and the missing field. Ids: the record's own
(``id`` / ``ID`` / ``unique_id`` / ``problem_id``), else ``line-N`` / ``record-N``; they must be unique.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ppl_scaling.jsonl import clip

from .answers import extract_boxed

__all__ = ["Problem", "Dataset", "load_problems", "normalize_level", "DatasetUnavailable"]

PROBLEM_KEYS = ("problem", "Problem", "question", "Question")
ANSWER_KEYS = ("answer", "Answer", "final_answer")
ID_KEYS = ("id", "ID", "unique_id", "problem_id", "idx")
LEVEL_KEYS = ("level", "Level", "difficulty")
SUBJECT_KEYS = ("subject", "Subject", "type")
JSON_LIST_KEYS = ("data", "examples", "rows", "problems")
_GSM8K = re.compile(r"####\s*(.+?)\s*$", re.S)
_LEVEL = re.compile(r"(?i)^\s*(?:level\s*)?(-?\d+)\s*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class DatasetUnavailable(ValueError):
    """A dataset that could not be loaded (hub offline, not found, ``datasets`` missing)."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    level: int | None = None
    subject: str | None = None


@dataclass(frozen=True)
class Dataset:
    """The problems of one source; ``name``: the file / folder / hub id's own name (recorded)."""

    name: str
    records: tuple[Problem, ...]

    def content_hash(self) -> str:
        """sha256 over every record's id, problem and answer (plus level and subject when
        the dataset has any): the dataset's identity in the results file's settings."""
        from .evaluate import content_hash

        extra = any(r.level is not None or r.subject is not None for r in self.records)
        return content_hash([(r.id, r.problem, r.answer, *((r.level, r.subject) if extra else ()))
                             for r in self.records])


def normalize_level(value: Any) -> int | None:
    """5 -> 5, "Level 3" -> 3, "3" -> 3; None for a missing or unknown level ("Level ?")."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    m = _LEVEL.match(str(value))
    return int(m.group(1)) if m else None


def _first(row: dict, keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        v = row.get(k)
        if v is not None and not (isinstance(v, str) and not v.strip()):
            return k, v
    return None, None


def _text(v: Any) -> str:
    return str(v).strip() if not isinstance(v, float) or not v.is_integer() else str(int(v))


def parse_record(row: Any, where: str, default_id: str) -> Problem:
    """One record as a ``Problem``; ``where`` ("file:3" or "file: record 3") prefixes errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with a problem and an answer, got {clip(repr(row), 200)}")
    pkey, problem = _first(row, PROBLEM_KEYS)
    if pkey is None:
        raise ValueError(f"{where}: missing field 'problem' (or 'question' / 'Problem'); found fields "
                         f"{clip(', '.join(map(repr, row)), 200) or 'none'}")
    akey, answer = _first(row, ANSWER_KEYS)
    if akey is not None:
        answer = _text(answer)
        m = _GSM8K.search(answer) if "####" in answer else None
        if m:                                    # GSM8K: the worked solution ends "#### n"
            answer = m.group(1).replace(",", "").strip()
            if not answer:
                raise ValueError(f"{where}: field {akey!r} has an empty '#### ' answer")
    else:
        skey, solution = _first(row, ("solution", "Solution"))
        if skey is None:
            raise ValueError(f"{where}: missing field 'answer' (or a 'solution' whose last \\boxed{{}} is the "
                             "answer); the reference answer, e.g. \"42\" or \"\\\\frac{1}{2}\"")
        answer = extract_boxed(str(solution))
        if not answer:
            raise ValueError(f"{where}: no 'answer' field and the 'solution' has no \\boxed{{}} answer")
    _, ident = _first(row, ID_KEYS)
    _, level = _first(row, LEVEL_KEYS)
    _, subject = _first(row, SUBJECT_KEYS)
    return Problem(id=default_id if ident is None else str(ident), problem=str(problem), answer=str(answer),
                   level=normalize_level(level), subject=None if subject is None else str(subject))


def and_list(numbers: Sequence[int], most: int = 10) -> str:
    """"1 and 3", "1, 3 and 7", "1, 2, ... (12 in all)"."""
    words = [str(n) for n in numbers]
    if len(words) > most:
        return ", ".join(words[:most]) + f", ... ({len(words)} in all)"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def refuse_duplicate_ids(label: str, positions: dict[str, list[int]], where: str) -> None:
    """Raise ``ValueError`` naming up to 5 ids that occur more than once in ``positions``
    (id -> line / record / item numbers; ``where``: "on lines", "on records", "at items")."""
    dupes = {k: v for k, v in positions.items() if len(v) > 1}
    if dupes:
        shown = "; ".join(f"{clip(repr(k), 60)} {where} {and_list(v)}" for k, v in list(dupes.items())[:5])
        more = f" (and {len(dupes) - 5} more ids)" if len(dupes) > 5 else ""
        raise ValueError(f"{label}: duplicate problem ids: {shown}{more}; every problem needs its own id "
                         "(results are keyed by it)")


def _build(name: str, label: str, items: Iterable[tuple[int, Any]], unit: str) -> Dataset:
    """Records from (number, raw row); ``unit``: "line" (file:N) or "record" (file: record N)."""
    records: list[Problem] = []
    where_of: dict[str, list[int]] = {}
    for n, row in items:
        where = f"{label}:{n}" if unit == "line" else f"{label}: record {n}"
        rec = parse_record(row, where, f"{unit}-{n}")
        where_of.setdefault(rec.id, []).append(n)
        records.append(rec)
    refuse_duplicate_ids(label, where_of, f"on {unit}s")
    if not records:
        raise ValueError(f"{label}: the dataset has no problems")
    return Dataset(name, tuple(records))


def _jsonl_rows(path: Path, label: str) -> Iterable[tuple[int, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{label}:{lineno}: not valid JSON ({e.msg}): {clip(line.strip())}") from None


def _json_rows(path: Path, label: str) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}: not valid JSON ({e.msg} at line {e.lineno}); a JSON dataset is a list of "
                         "objects (a JSONL dataset: one object per line, named *.jsonl)") from None
    if isinstance(data, dict):
        lists = [k for k in JSON_LIST_KEYS if isinstance(data.get(k), list)]
        if lists:
            data = data[lists[0]]
        elif any(k in data for k in PROBLEM_KEYS):
            data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{label}: expected a JSON list of problem objects (or an object with a "
                         f"{' / '.join(map(repr, JSON_LIST_KEYS))} list), got {type(data).__name__}")
    return list(enumerate(data, 1))


def _import_datasets(what: str):
    try:
        import datasets  # noqa: PLC0415 -- optional, heavy
    except ImportError:
        raise DatasetUnavailable(f"{what} needs the Hugging Face `datasets` library: pip install datasets "
                                 "(or pass a JSONL / JSON file)") from None
    return datasets


def _one_split(ds: Any, label: str, split: str | None) -> Any:
    """A DatasetDict's ``split`` (default: test, else its only split)."""
    if not isinstance(ds, dict):   # a Dataset (a DatasetDict is a dict of them)
        return ds
    splits = list(ds.keys())
    if split is not None:
        if split not in splits:
            raise ValueError(f"{label}: no split {split!r}; it has {', '.join(map(repr, splits))}")
        return ds[split]
    if "test" in splits:
        return ds["test"]
    if len(splits) == 1:
        return ds[splits[0]]
    raise ValueError(f"{label}: several splits ({', '.join(map(repr, splits))}) and none is 'test'; "
                     "pass one with split=")


def load_problems(source: str | Path, split: str | None = None) -> Dataset:
    """The problems of a JSONL / JSON file, a local ``datasets`` folder or a hub id (see the module)."""
    label = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        try:
            if path.suffix.lower() == ".json":
                return _build(path.name, label, _json_rows(path, label), "record")
            return _build(path.name, label, _jsonl_rows(path, label), "line")
        except UnicodeDecodeError:
            raise ValueError(f"{label}: not UTF-8 text (a JSON / JSONL dataset is UTF-8)") from None
    if path.is_dir():
        datasets = _import_datasets(f"the dataset folder {label!r}")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 -- not a saved dataset
            raise ValueError(f"{label}: not a dataset saved by `datasets` (save_to_disk) nor a file: "
                             f"{clip(' '.join(str(e).split()), 200)}") from None
        ds = _one_split(ds, label, split)
        return _build(path.name, label, enumerate(ds, 1), "record")
    if _HUB_ID.match(label) and "/" in label and not label.endswith((".json", ".jsonl")):
        datasets = _import_datasets(f"the hub dataset {label!r}")
        try:
            ds = datasets.load_dataset(label, split=split) if split else datasets.load_dataset(label)
        except Exception as e:  # noqa: BLE001 -- offline, not found, gated, ...
            raise DatasetUnavailable(f"the dataset {label!r} could not be loaded from the Hugging Face hub "
                                     f"({type(e).__name__}: {clip(' '.join(str(e).split()), 200)}); "
                                     "pass a local JSONL / JSON file or a saved dataset folder instead") from None
        ds = _one_split(ds, label, split)
        return _build(label, label, enumerate(ds, 1), "record")
    raise FileNotFoundError(f"dataset file {label!r} does not exist; pass a JSONL or JSON file of problems "
                            "(MATH, GSM8K or AIME style: {\"problem\": ..., \"answer\": ...}), a saved `datasets` "
                            "folder, or a hub id such as HuggingFaceH4/MATH-500")
