"""The bundled toy task: multi-step arithmetic, answered one step per line.

A problem is a start value and a few operations; the answer is written line by
line, each line applying the next operation to the running total::

    prompt      "Q:24+5-4-7+6\\n"
    completion  "24+5=29\\n29-4=25\\n25-7=18\\n18+6=24\\nA:24\\n"   (then EOS)

Start values are 1-30, operands 1-9, running totals stay in 0-99; the
difficulty of a problem is its number of operations (1-5).

    problems = load_split("test")            # 200 fixed held-out problems, 40 per difficulty
    p = problems[0]; p.prompt, p.answer
    check_steps(p.prompt, ["24+5=29\\n"])     # the exact step checker (a perfect PRM)
    is_correct(completion, p.answer)         # outcome check of the "A:<n>" line
    predicted_answer(p.prompt, steps)        # the answer a partial solution leads to (running total)

The exact checker judges every line of the steps so far (a final line without
"\\n" counts as a whole line): line i < #operations must read ``a{op}b=c`` with
``a`` the running total, ``op b`` the question's i-th operation and ``c`` the
result; the next line must read ``A:<answer>``; nothing may follow it.

``TOY_LM_PATH`` and ``TOY_PRM_PATH`` are the bundled tiny Llama LM and learned
(deliberately imperfect) PRM, trained by ``scripts/train_toy_lm.py`` and
``scripts/train_toy_prm.py`` (``make toy-models``). On the test split the LM
at temperature 1 has pass@1 0.35, pass@16 0.93, majority@16 0.39; the PRM,
on the LM's own samples, step-level AUC 0.91 and false-positive rate 0.11
(``metrics.json`` in each folder).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:   # only for hints: this module also loads standalone (benchmarks' LLaMPPL worker)
    from .types import Partial

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_LM_PATH = ASSETS / "toy_lm"
TOY_PRM_PATH = ASSETS / "toy_prm"

DIFFICULTIES = (1, 2, 3, 4, 5)
START_RANGE = (1, 30)
OPERAND_RANGE = (1, 9)
TOTAL_RANGE = (0, 99)
STEP_DELIMITER = "\n"

# Held-out splits: (seed, problems per difficulty). Generated, never stored, so
# they are identical wherever the package runs; training excludes both.
_SPLITS = {"test": (20261123, 40), "validation": (20261124, 40)}

_QUESTION_RE = re.compile(r"^(\d+)((?:[+-]\d+)+)$")
_OP_RE = re.compile(r"([+-])(\d+)")
_ANSWER_RE = re.compile(r"^A:(-?\d+)$", re.MULTILINE)

Operation = tuple[str, int]  # ("+", 5)


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem: ``question`` like "24+5-4", ``answer`` its value."""

    id: str
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        """What the model is given: ``"Q:<question>\\n"``."""
        return f"Q:{self.question}{STEP_DELIMITER}"

    @property
    def difficulty(self) -> int:
        """The number of operations."""
        return len(parse_question(self.question)[1])

    @property
    def solution(self) -> str:
        """The correct completion (without EOS)."""
        return "".join(solution_steps(self.question))


# ----------------------------------------------------------------------------- parsing


def parse_question(text: str) -> tuple[int, list[Operation]]:
    """Split a question ("24+5-4", or the prompt "Q:24+5-4\\n") into start value and operations."""
    q = text.strip()
    if q.startswith("Q:"):
        q = q[2:]
    m = _QUESTION_RE.match(q)
    if m is None:
        raise ValueError(f"not a toy arithmetic question: {text!r}; expected e.g. 'Q:24+5-4\\n' or '24+5-4'")
    return int(m.group(1)), [(op, int(b)) for op, b in _OP_RE.findall(m.group(2))]


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def solve(question: str) -> int:
    """The value of a question."""
    total, ops = parse_question(question)
    for op, b in ops:
        total = _apply(total, op, b)
    return total


def solution_steps(question: str) -> list[str]:
    """The correct step lines, each with its trailing "\\n", ending with "A:<answer>\\n"."""
    total, ops = parse_question(question)
    steps = []
    for op, b in ops:
        new = _apply(total, op, b)
        steps.append(f"{total}{op}{b}={new}{STEP_DELIMITER}")
        total = new
    steps.append(f"A:{total}{STEP_DELIMITER}")
    return steps


# ----------------------------------------------------------------------------- checking


def split_lines(steps: Sequence[str] | str) -> list[str]:
    """The lines of the steps so far (joined first, so any step delimiter works);
    a final line without "\\n" is kept as a line."""
    text = steps if isinstance(steps, str) else "".join(steps)
    lines = text.split(STEP_DELIMITER)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def step_correctness(question: str, steps: Sequence[str] | str) -> list[bool]:
    """For each line of ``steps``: whether it and every line before it are correct.

    The result is monotone (once False, False after); its length is the number of lines.
    """
    expected = [s[: -len(STEP_DELIMITER)] for s in solution_steps(question)]
    flags: list[bool] = []
    ok = True
    for i, line in enumerate(split_lines(steps)):
        ok = ok and i < len(expected) and line == expected[i]
        flags.append(ok)
    return flags


def check_steps(question: str, steps: Sequence[str] | str) -> bool:
    """The exact step checker (a perfect PRM): True iff every step line so far is
    correct (arithmetic right, the question's operations in order, the final
    "A:" line equal to the result). No steps yet counts as correct."""
    return all(step_correctness(question, steps))


def is_complete(question: str, steps: Sequence[str] | str) -> bool:
    """True iff ``steps`` is the whole correct solution."""
    return split_lines(steps) == split_lines(solution_steps(question))


def extract_answer(text: str) -> int | None:
    """The integer of the first "A:<n>" line of ``text``, or None if there is none (or if the
    number is longer than Python converts, ``sys.get_int_max_str_digits()``: no toy answer is)."""
    m = _ANSWER_RE.search(text)
    if m is None or len(m.group(1)) > sys.get_int_max_str_digits() - 1:
        return None
    return int(m.group(1))


def is_correct(completion: str, answer: int | str) -> bool:
    """Outcome check: the completion's "A:<n>" line equals ``answer``."""
    got = extract_answer(completion)
    return got is not None and got == int(answer)


def exact_step_scores(question: str, steps: Sequence[str]) -> list[bool]:
    """The exact checker as a PRM's step scores: step j is right iff every line up to it is
    (``ProcessRewardModel.from_function(exact_step_scores)`` is a perfect PRM)."""
    return [check_steps(question, steps[:j + 1]) for j in range(len(steps))]


_LINE_RE = re.compile(r"^\d+[+-]\d+=(-?\d+)$")


def predicted_answer(question: str, steps: Sequence[str] | str) -> int | None:
    """The final answer a partial solution leads to if the rest is done right: the "A:" line's
    number once written, else the running total of the last step line plus the operations
    still to apply; None when the last line is not a step line (or there are no steps)."""
    lines = split_lines(steps)
    _, ops = parse_question(question)
    if not lines or len(lines) > len(ops):
        return extract_answer("\n".join(lines))
    m = _LINE_RE.match(lines[-1])
    if m is None:
        return None
    total = int(m.group(1))
    for op, b in ops[len(lines):]:
        total = _apply(total, op, b)
    return total


def same_predicted_answer(a: Partial, b: Partial) -> bool:
    """DeepPrune's same-final-answer judge on two ``Partial`` solutions of one question, exact
    from the running totals (``predicted_answer``): redundant iff both predict the same answer."""
    pa = predicted_answer(a.question, a.steps)
    return pa is not None and pa == predicted_answer(b.question, b.steps)


# ----------------------------------------------------------------------------- generation


def generate_problem(rng: np.random.Generator, difficulty: int, id: str = "") -> Problem:
    """A random problem with ``difficulty`` operations.

    Start value uniform on 1-30; each operation draws a sign and an operand
    (1-9) uniformly, redrawn until the running total stays in 0-99.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {DIFFICULTIES} (number of operations), got {difficulty!r}")
    total = int(rng.integers(START_RANGE[0], START_RANGE[1] + 1))
    question = str(total)
    for _ in range(difficulty):
        while True:
            op = "+" if rng.integers(2) == 0 else "-"
            b = int(rng.integers(OPERAND_RANGE[0], OPERAND_RANGE[1] + 1))
            new = _apply(total, op, b)
            if TOTAL_RANGE[0] <= new <= TOTAL_RANGE[1]:
                break
        question += f"{op}{b}"
        total = new
    return Problem(id=id, question=question, answer=total)


def generate_problems(rng: np.random.Generator, n: int, difficulty: int | None = None, *,
                      exclude: Iterable[str] = (), prefix: str = "toy") -> list[Problem]:
    """``n`` random problems (difficulty uniform on 1-5 unless given), none of
    whose questions is in ``exclude``; ids ``f"{prefix}-{i}"``."""
    excluded = set(exclude)
    out: list[Problem] = []
    while len(out) < n:
        d = difficulty if difficulty is not None else int(rng.choice(DIFFICULTIES))
        p = generate_problem(rng, d, id=f"{prefix}-{len(out)}")
        if p.question not in excluded:
            out.append(p)
    return out


@lru_cache(maxsize=None)
def _split(name: str) -> tuple[Problem, ...]:
    if name not in _SPLITS:
        raise ValueError(f"unknown split {name!r}; choose one of {sorted(_SPLITS)}")
    seed, per_difficulty = _SPLITS[name]
    rng = np.random.default_rng(seed)
    # Each split avoids the questions of the splits listed before it: all are disjoint.
    earlier = list(_SPLITS)[: list(_SPLITS).index(name)]
    taken: set[str] = {p.question for other in earlier for p in _split(other)}
    problems: list[Problem] = []
    for d in DIFFICULTIES:
        count = 0
        while count < per_difficulty:
            p = generate_problem(rng, d)
            if p.question not in taken:
                taken.add(p.question)
                problems.append(p)
                count += 1
    # Shuffled, so that any leading subset mixes the difficulties.
    order = rng.permutation(len(problems))
    return tuple(Problem(id=f"{name}-{i:04d}", question=problems[j].question, answer=problems[j].answer)
                 for i, j in enumerate(order))


def load_split(name: str = "test") -> list[Problem]:
    """A fixed held-out split: "test" (200 problems, 40 per difficulty) or
    "validation" (same size, used by the trainers to pick checkpoints)."""
    return list(_split(name))


def held_out_questions() -> frozenset[str]:
    """Every question of every held-out split (training data must avoid them)."""
    return frozenset(p.question for name in _SPLITS for p in _split(name))


def training_problems(rng: np.random.Generator, n: int) -> list[Problem]:
    """Fresh random problems for training, never a held-out question."""
    return generate_problems(rng, n, exclude=held_out_questions(), prefix="train")


# ----------------------------------------------------------------------------- JSONL


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems as a user dataset: lines ``{"id", "problem" (the prompt), "answer"}``."""
    path = Path(path)
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"id": p.id, "problem": p.prompt, "answer": str(p.answer)}) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Problem]:
    """Read a dataset written by ``write_jsonl`` (or by hand: ``problem`` may be
    "Q:24+5\\n" or "24+5"; ``id`` is optional; ``answer`` must match the question)."""
    problems = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("problem", "answer"):
                if key not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {key!r}; "
                                     "each line needs 'problem' and 'answer'")
            start, ops = parse_question(row["problem"])
            question = str(start) + "".join(f"{op}{b}" for op, b in ops)
            answer = int(row["answer"])
            if answer != solve(question):
                raise ValueError(f"{path}:{lineno}: answer {answer} is wrong for {question!r} "
                                 f"(its value is {solve(question)})")
            problems.append(Problem(id=str(row.get("id", f"line-{lineno}")), question=question, answer=answer))
    return problems
