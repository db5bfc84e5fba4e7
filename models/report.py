"""Reports of evaluation results: accuracy table and scaling curves.

    rows = load_rows("results.jsonl")
    table = accuracy_table(rows)            # {(method, budget): Cell(accuracy, se, n, tokens, ...)}
    print(format_table(table))              # markdown: methods x budgets, "acc ± se"
    plot_scaling(rows, "scaling.png")       # accuracy vs budget, accuracy vs generated tokens

The standard error of an accuracy over n problems is sqrt(acc (1 - acc) / n).
Mean tokens, reward calls and wall time are per problem, from the compute ledger
columns of the rows (``tokens``, ``reward_calls``, ``wall_s``; see ``evaluate``).
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Cell:
    accuracy: float
    se: float
    n: int
    tokens: float
    reward_calls: float
    wall_s: float
    coverage: float     # fraction of problems where some candidate was correct


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results JSONL file (a truncated last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist; write one with `ppl-scaling eval`")
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
    if not rows:
        raise ValueError(f"{path} holds no results")
    return rows


def accuracy_table(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], Cell]:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], int(r["budget"]))].append(r)
    table = {}
    for key, rs in groups.items():
        acc = float(np.mean([bool(r["correct"]) for r in rs]))
        mean = lambda k: float(np.mean([r.get(k, 0) or 0 for r in rs]))  # noqa: E731
        table[key] = Cell(acc, float(np.sqrt(acc * (1 - acc) / len(rs))), len(rs), mean("tokens"),
                          mean("reward_calls"), mean("wall_s"),
                          float(np.mean([bool(r.get("any_correct", r["correct"])) for r in rs])))
    return table


def _methods_budgets(table: dict[tuple[str, int], Cell]) -> tuple[list[str], list[int]]:
    methods = list(dict.fromkeys(m for m, _ in table))
    return methods, sorted({b for _, b in table})


def format_table(table: dict[tuple[str, int], Cell], what: str = "accuracy") -> str:
    """Markdown table, methods x budgets: accuracy ± se (``what="accuracy"``), or mean
    ``tokens`` / ``wall_s`` / ``reward_calls`` / ``coverage`` per problem."""
    methods, budgets = _methods_budgets(table)
    lines = [f"| method \\ budget ({what}) | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            c = table.get((m, b))
            if c is None:
                cells.append("")
            elif what == "accuracy":
                cells.append(f"{c.accuracy:.3f} ± {c.se:.3f}")
            else:
                cells.append(f"{getattr(c, what):.3g}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n = "/".join(map(str, sorted({c.n for c in table.values()})))
    lines.append(f"\n{n} problems per cell" + ("; ± one standard error." if what == "accuracy" else "; means per problem."))
    return "\n".join(lines)


def plot_scaling(rows: Sequence[dict[str, Any]], path: str | Path | None = None, axes: Any = None) -> Any:
    """Two panels: accuracy vs budget N and accuracy vs mean generated tokens per problem
    (log-scale x, ± one standard error). Saves to ``path`` if given; returns the axes."""
    import matplotlib.pyplot as plt

    table = accuracy_table(rows)
    methods, _ = _methods_budgets(table)
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        cells = sorted((b, c) for (mm, b), c in table.items() if mm == m)
        b = np.array([b for b, _ in cells])
        acc = np.array([c.accuracy for _, c in cells])
        se = np.array([c.se for _, c in cells])
        tok = np.array([max(c.tokens, 1.0) for _, c in cells])
        axes[0].errorbar(b, acc, yerr=se, marker="o", capsize=2, label=m)
        axes[1].errorbar(tok, acc, yerr=se, marker="o", capsize=2, label=m)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    budgets = sorted({b for _, b in table})
    axes[0].set(xscale="log", xlabel="budget N (particles / samples)", ylabel="accuracy", title="Accuracy vs budget",
                xticks=budgets)
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


def report(path: str | Path, plot: str | Path | None = None) -> str:
    """The text report of a results file (accuracy, tokens and wall time tables); draws the plot."""
    rows = load_rows(path)
    table = accuracy_table(rows)
    parts = [format_table(table), format_table(table, "tokens"), format_table(table, "wall_s")]
    if plot is not None:
        plot_scaling(rows, plot)
        parts.append(f"plot written to {plot}")
    return "\n\n".join(parts)
