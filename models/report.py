"""Reports of evaluation results: checked rows, accuracy tables and scaling curves.

    results = read_results("results.jsonl")   # valid rows by settings, and what was skipped and why
    table = accuracy_table(results.rows)      # {(method, budget): Cell(accuracy, se, n, errors, ...)}
    print(format_table(table))                # markdown: methods x budgets, "acc ± se"
    plot_scaling(results.rows, "scaling.png") # accuracy vs budget, accuracy vs generated tokens
    print(report("results.jsonl"))            # all of it, one section per settings (+ pass@k of each rule)

**Rows are checked** (``row_problem``): a row is a JSON object with ``problem_id``,
``method``, ``budget`` (a positive integer) and either ``correct`` (true or false, never
the string "false") or an ``error`` (a failed run, ``correct`` null); the ledger
columns, when present, are non-negative numbers. Lines that fail (not JSON, not an
object, a wrong field, a duplicate run) are skipped and counted, with the first reason;
an incomplete last line (an interrupted write) is skipped too.

**Settings are never mixed.** Rows are grouped by their ``settings_id`` (the header of
the file written by ``evaluate`` records the settings it stands for); rows of older
files, without one, by their own seed / task / model / prm fields. ``report`` prints one
section per group, naming what differs; ``accuracy_table`` refuses rows of several
groups.

**Errors are never counted as right or wrong.** The accuracy of a cell is over its graded
rows (``n``); failed runs are counted apart (``errors``) and shown next to the accuracy.
The standard error of an accuracy over n problems is sqrt(acc (1 - acc) / n).
Mean tokens, reward calls and wall time are per graded problem, from the compute ledger
columns of the rows (``tokens``, ``reward_calls``, ``wall_s``; see ``evaluate``).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ppl_scaling.jsonl import clip, is_header

GROUP = "_group"   # not a column of the file: the settings group of a row read by ``read_results``
NUMBERS = ("tokens", "prefill_tokens", "forward_passes", "reward_calls", "reward_tokens", "nfe", "wall_s",
           "frac_correct", "num_answers", "grading_timeouts", "final_ess", "resamplings")
LEGACY_SETTINGS = ("task", "seed", "model", "prm")
SUMMARY = ("task", "dataset", "model", "prm", "seed", "temperature")   # the settings a report's heading names


@dataclass(frozen=True)
class Cell:
    accuracy: float     # over the graded rows; nan if every run of the cell failed
    se: float
    n: int              # graded rows (problems with a correct / incorrect answer)
    tokens: float
    reward_calls: float
    wall_s: float
    coverage: float     # fraction of problems where some candidate was correct
    errors: int = 0     # failed runs (error rows), in neither the accuracy nor n
    grading_timeouts: int = 0   # candidate answers whose grading timed out (counted incorrect)


@dataclass
class Results:
    """What ``read_results`` found: valid rows (each with its settings group in ``GROUP``),
    the settings of each group (None where no header names them) and the skipped lines."""

    path: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    groups: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)   # (line number, reason)
    lines: int = 0

    def by_group(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {g: [] for g in self.groups}
        for r in self.rows:
            out.setdefault(r[GROUP], []).append(r)
        return {g: rs for g, rs in out.items() if rs}

    def skipped_note(self) -> str | None:
        if not self.skipped:
            return None
        line, reason = self.skipped[0]
        return (f"skipped {len(self.skipped)} of {self.lines} lines of {self.path} "
                f"(first: line {line}: {reason})")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _shown(value: Any, limit: int) -> str:
    return clip(json.dumps(value, default=str), limit)


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a valid result row, or None if it is one."""
    if not isinstance(row, dict):
        return f"not a JSON object: {_shown(row, 60)}"
    for k in ("problem_id", "method", "budget"):
        if k not in row:
            return f"missing field {k!r} (not a result row: {_shown(row, 60)})"
    if isinstance(row["problem_id"], bool) or not isinstance(row["problem_id"], (str, int)):
        return f"'problem_id' must be a string, got {_shown(row['problem_id'], 40)}"
    if not isinstance(row["method"], str) or not row["method"]:
        return f"'method' must be a method name, got {_shown(row['method'], 40)}"
    b = row["budget"]
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        return f"'budget' must be a positive integer, got {_shown(b, 40)}"
    if row.get("error") is not None:
        if not isinstance(row["error"], str):
            return f"'error' must be a message, got {_shown(row['error'], 40)}"
        if row.get("correct") is not None:
            return "an error row cannot have a 'correct' value"
    elif "correct" not in row:
        return "missing field 'correct' (and no 'error')"
    elif not isinstance(row["correct"], bool):
        return f"'correct' must be true or false, got {_shown(row['correct'], 40)}"
    for k in NUMBERS:
        v = row.get(k)
        if v is not None and (not _is_number(v) or v < 0):
            return f"{k!r} must be a non-negative number, got {_shown(v, 40)}"
    if row.get("any_correct") is not None and not isinstance(row["any_correct"], bool):
        return f"'any_correct' must be true or false, got {_shown(row['any_correct'], 40)}"
    if "settings_id" in row and not isinstance(row["settings_id"], str):
        return f"'settings_id' must be a string, got {_shown(row['settings_id'], 40)}"
    return None


def _legacy_group(row: dict[str, Any]) -> str:
    return "legacy:" + json.dumps({k: row.get(k) for k in LEGACY_SETTINGS}, sort_keys=True, default=str)


def read_results(path: str | Path) -> Results:
    """The valid rows of a results file, grouped by settings; invalid lines are skipped
    (with their line number and reason), an incomplete last line too. Raises if the file
    is missing or holds no valid row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist; write one with `ppl-scaling eval`")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a results file (not UTF-8 text)") from None
    lines = text.split("\n")
    res = Results(str(path))
    seen: dict[tuple, int] = {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        res.lines += 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            last = i == len(lines)   # no newline after it
            res.skipped.append((i, "an incomplete last line (an interrupted write)" if last
                                else f"not valid JSON ({e.msg}): {clip(line, 60)}"))
            continue
        if is_header(rec):
            if isinstance(rec.get("settings_id"), str) and isinstance(rec.get("settings"), dict):
                res.groups.setdefault(rec["settings_id"], rec["settings"])
            else:
                res.skipped.append((i, "a malformed results header"))
            continue
        why = row_problem(rec)
        if why is not None:
            res.skipped.append((i, why))
            continue
        group = rec["settings_id"] if "settings_id" in rec else _legacy_group(rec)
        key = (group, rec["problem_id"], rec["method"], rec["budget"])
        if key in seen:
            res.skipped.append((i, f"a second row for problem {clip(rec['problem_id'], 40)}, {rec['method']}, "
                                   f"budget {rec['budget']} (first on line {seen[key]})"))
            continue
        seen[key] = i
        res.groups.setdefault(group, None)
        res.rows.append({**rec, GROUP: group})
    if not res.rows:
        note = res.skipped_note()
        raise ValueError(f"{path} holds no result rows" + (f"; {note}" if note else ""))
    return res


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The valid rows of a results file (``read_results(path).rows``)."""
    return read_results(path).rows


def _group_of(row: dict[str, Any]) -> str:
    if GROUP in row:
        return row[GROUP]
    return row["settings_id"] if "settings_id" in row else _legacy_group(row)


def accuracy_table(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], Cell]:
    """{(method, budget): Cell} of rows of one settings group (rows of several raise
    ``ValueError``; ``report`` splits them). Invalid rows raise ``ValueError``."""
    rows = list(rows)
    for r in rows:
        why = row_problem(r)
        if why is not None:
            raise ValueError(f"not a valid result row ({why})")
    groups = {_group_of(r) for r in rows}
    if len(groups) > 1:
        raise ValueError(f"the rows come from {len(groups)} different settings; tabulate each apart "
                         "(Results.by_group(), or `ppl-scaling report`, which shows one table per settings)")
    cells: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["method"], int(r["budget"]))].append(r)
    table = {}
    for key, rs in cells.items():
        graded = [r for r in rs if r.get("error") is None]
        n = len(graded)
        acc = float(np.mean([r["correct"] for r in graded])) if n else float("nan")
        se = float(np.sqrt(acc * (1 - acc) / n)) if n else float("nan")
        mean = lambda k: float(np.mean([r.get(k) or 0 for r in graded])) if n else float("nan")  # noqa: E731
        coverage = float(np.mean([r.get("any_correct", r["correct"]) for r in graded])) if n else float("nan")
        table[key] = Cell(acc, se, n, mean("tokens"), mean("reward_calls"), mean("wall_s"), coverage,
                          errors=len(rs) - n, grading_timeouts=int(sum(r.get("grading_timeouts") or 0 for r in graded)))
    return table


def _methods_budgets(table: dict[tuple[str, int], Cell]) -> tuple[list[str], list[int]]:
    methods = list(dict.fromkeys(m for m, _ in table))
    return methods, sorted({b for _, b in table})


def format_table(table: dict[tuple[str, int], Cell], what: str = "accuracy") -> str:
    """Markdown table, methods x budgets: accuracy ± se (``what="accuracy"``; failed runs
    as "(k err)"), or mean ``tokens`` / ``wall_s`` / ``reward_calls`` / ``coverage`` per problem."""
    methods, budgets = _methods_budgets(table)
    lines = [f"| method \\ budget ({what}) | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            c = table.get((m, b))
            if c is None:
                cells.append("")
                continue
            if c.n == 0:
                text = "—"
            elif what == "accuracy":
                text = f"{c.accuracy:.3f} ± {c.se:.3f}"
            else:
                text = f"{getattr(c, what):.3g}"
            if what == "accuracy" and c.errors:
                text += f" ({c.errors} err)"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n = "/".join(map(str, sorted({c.n for c in table.values()})))
    lines.append(f"\n{n} problems per cell" + ("; ± one standard error." if what == "accuracy" else "; means per problem."))
    errors = sum(c.errors for c in table.values())
    timeouts = sum(c.grading_timeouts for c in table.values())
    if what == "accuracy" and errors:
        lines.append(f"{errors} runs failed (error rows, counted in no accuracy; `ppl-scaling eval ... "
                     "--retry-errors` reruns them).")
    if what == "accuracy" and timeouts:
        lines.append(f"{timeouts} candidate answers timed out in grading (counted incorrect; see grading_timeouts).")
    return "\n".join(lines)


PASS_RULE_NAMES = {"argmax_reward": "BoN", "majority_vote": "majority", "best_of_majority": "BoM"}


def pass_at_k_table(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], dict[tuple[str, int], tuple[float, int]]]:
    """{(method, budget): {(rule, k): (mean pass@k, problems)}} over the graded rows of one
    settings group that record ``pass_at_k`` (rules without a value in a row are skipped)."""
    acc: dict[tuple[str, int], dict[tuple[str, int], list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        table = r.get("pass_at_k")
        if r.get("error") is not None or not isinstance(table, dict):
            continue
        for rule, by_k in table.items():
            if not isinstance(by_k, dict):
                continue
            for k, v in by_k.items():
                if isinstance(v, bool) and str(k).isdigit():
                    acc[(r["method"], int(r["budget"]))][(str(rule), int(k))].append(v)
    return {cell: {rk: (float(np.mean(vs)), len(vs)) for rk, vs in by_rule.items()} for cell, by_rule in acc.items()}


def format_pass_at_k(table: dict[tuple[str, int], dict[tuple[str, int], tuple[float, int]]]) -> str:
    """Markdown table: (method, budget) x (rule, k), the mean pass@k over problems."""
    cols = sorted({rk for by in table.values() for rk in by},
                  key=lambda rk: (list(PASS_RULE_NAMES).index(rk[0]) if rk[0] in PASS_RULE_NAMES else 99, rk[0], rk[1]))
    lines = ["| method | N | " + " | ".join(f"{PASS_RULE_NAMES.get(r, r)} pass@{k}" for r, k in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for (m, b) in sorted(table, key=lambda mb: (list(dict.fromkeys(x for x, _ in table)).index(mb[0]), mb[1])):
        by = table[(m, b)]
        lines.append(f"| {m} | {b} | " + " | ".join(f"{by[rk][0]:.3f}" if rk in by else "" for rk in cols) + " |")
    lines.append("\npass@k of each answer rule from each run's candidates (BoN: top-k distinct answers by "
                 "reward, majority: by frequency, BoM: Best-of-Majority); means over problems.")
    return "\n".join(lines)


def plot_scaling(rows: Sequence[dict[str, Any]], path: str | Path | None = None, axes: Any = None) -> Any:
    """Two panels: accuracy vs budget N and accuracy vs mean generated tokens per problem
    (log-scale x, ± one standard error). Rows of several settings are drawn as separate
    curves (labelled [1], [2], ...). Saves to ``path`` if given; returns the axes."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_group_of(r), []).append(r)
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    budgets: set[int] = set()
    for gi, rs in enumerate(groups.values(), 1):
        table = accuracy_table(rs)
        methods, _ = _methods_budgets(table)
        budgets |= {b for _, b in table}
        for m in methods:
            cells = sorted((b, c) for (mm, b), c in table.items() if mm == m and c.n > 0)
            if not cells:
                continue
            b = np.array([b for b, _ in cells])
            acc = np.array([c.accuracy for _, c in cells])
            se = np.array([c.se for _, c in cells])
            tok = np.array([max(c.tokens, 1.0) for _, c in cells])
            label = m if len(groups) == 1 else f"{m} [{gi}]"
            axes[0].errorbar(b, acc, yerr=se, marker="o", capsize=2, label=label)
            axes[1].errorbar(tok, acc, yerr=se, marker="o", capsize=2, label=label)
    axes[0].set(xscale="log", xlabel="budget N (particles / samples)", ylabel="accuracy", title="Accuracy vs budget",
                xticks=sorted(budgets))
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    axes[1].set(xscale="log", xlabel="generated tokens per problem", ylabel="accuracy",
                title="Accuracy vs compute")
    for ax in axes:
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=8)
    if path is not None:
        fig = axes[0].figure
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return axes


def _describe(settings: dict[str, Any] | None, keys: Sequence[str] | None = None, limit: int = 60) -> str:
    if settings is None:
        return "settings not recorded"
    keys = list(settings) if keys is None else keys
    return ", ".join(f"{k}={clip(json.dumps(settings.get(k)), limit)}" for k in keys)


def _heading(group: str, settings: dict[str, Any] | None, differing: list[str]) -> str:
    if group.startswith("legacy:"):
        return f"older rows without recorded settings ({_describe(json.loads(group[7:]))})"
    if settings is None:
        return f"settings {group} (its header is missing)"
    return f"settings {group}: " + (_describe(settings, differing) if differing else
                                    _describe(settings, [k for k in SUMMARY if k in settings]))


def report(path: str | Path, plot: str | Path | None = None) -> str:
    """The text report of a results file: what was skipped, then per settings group the
    accuracy (with error counts), tokens and wall time tables; draws the plot."""
    res = read_results(path)
    groups = res.by_group()
    known = {g: s for g, s in res.groups.items() if g in groups and s is not None}
    names = list(dict.fromkeys(k for s in known.values() for k in s))
    differing = [k for k in names if len({json.dumps(s.get(k), sort_keys=True) for s in known.values()}) > 1]
    parts = []
    note = res.skipped_note()
    if note:
        parts.append(f"note: {note}")
    if len(groups) > 1:
        parts.append(f"note: {path} holds rows of {len(groups)} different settings; they are reported apart, "
                     "never merged")
    for gi, (g, rows) in enumerate(groups.items(), 1):
        table = accuracy_table(rows)
        section = [format_table(table), format_table(table, "tokens"), format_table(table, "wall_s")]
        fell = sorted({(r["method"], int(r["budget"]), str(r["fallback"])) for r in rows
                       if r.get("error") is None and r.get("fallback")})
        if fell:
            section.append("note: budgets too small for the method ran a fallback instead (see the rows' "
                           "'fallback'): " + ", ".join(f"{m} at N={b} ran {f}" for m, b, f in fell))
        passes = pass_at_k_table(rows)
        if passes:
            section.append(format_pass_at_k(passes))
        section.insert(0, f"## [{gi}] {_heading(g, res.groups.get(g), differing)}" if len(groups) > 1
                       else f"## {_heading(g, res.groups.get(g), differing)}")
        parts.extend(section)
    if plot is not None:
        plot_scaling(res.rows, plot)
        parts.append(f"plot written to {plot}")
    return "\n\n".join(parts)
