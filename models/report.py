"""Reports of evaluation results: checked rows, accuracy tables and scaling curves.

    results = read_results("results.jsonl")   # valid rows by settings, and what was skipped and why
    table = accuracy_table(results.rows)      # {(method, budget): Cell(accuracy, lo, hi, n, errors, ...)}
    print(format_table(table))                # markdown: methods x budgets, "acc [lo, hi]" (95 % Wilson)
    plot_scaling(results.rows, "scaling.png") # accuracy vs budget N, accuracy vs compute (tokens)
    compare_methods(rows, "particle_filtering", "best_of_n")   # paired differences per budget (one settings)
    print(report("results.jsonl", compare=["particle_filtering,best_of_n"]))   # all of it

**Statistics for papers.** Accuracies carry 95 % Wilson score intervals (``wilson``;
never "± 0" at 0 % or 100 %). ``compare_methods`` pairs two methods on the problems both
graded at each budget: the mean paired difference, a seeded paired bootstrap 95 % CI
(resampling problems) and the exact McNemar p-value (``mcnemar_exact``: a two-sided
binomial test on the discordant pairs). Accuracy against compute uses the mean tokens
per problem, generated plus reward-model tokens (``tokens + reward_tokens``).
``coverage_table`` gives the mean pass@k per method, budget, rule and k (from the rows'
``pass_at_k`` columns, or from a per-candidate ``candidate_correct`` list of bools
with the unbiased estimator) and ``fit_coverage`` the Large Language Monkeys power law
c(k) = exp(-a k^-b) (least squares of log(-log c) on log k over the k with 0 < c < 1),
with its extrapolation to 4x the largest k; fewer than 2 such points give no fit.
Rows that carry a ``difficulty`` (the MATH level) get a per-difficulty table (``level_table``).

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
The standard error of an accuracy over n problems is sqrt(acc (1 - acc) / n) (kept in
``Cell.se``); tables and plots show the 95 % Wilson score interval (``Cell.lo``, ``Cell.hi``).
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
NUMBERS = ("tokens", "prefill_tokens", "forward_passes", "reward_calls", "reward_tokens", "nfe", "escalated_calls",
           "wall_s",
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
    lo: float = float("nan")    # 95 % Wilson score interval of the accuracy
    hi: float = float("nan")
    reward_tokens: float = 0.0  # mean reward-model tokens per graded problem

    @property
    def compute(self) -> float:
        """Mean tokens per problem: generated plus reward-model tokens."""
        return self.tokens + self.reward_tokens


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
        lo, hi = wilson(int(sum(r["correct"] for r in graded)), n)
        table[key] = Cell(acc, se, n, mean("tokens"), mean("reward_calls"), mean("wall_s"), coverage,
                          errors=len(rs) - n, grading_timeouts=int(sum(r.get("grading_timeouts") or 0 for r in graded)),
                          lo=lo, hi=hi, reward_tokens=mean("reward_tokens"))
    return table


def _methods_budgets(table: dict[tuple[str, int], Cell]) -> tuple[list[str], list[int]]:
    methods = list(dict.fromkeys(m for m, _ in table))
    return methods, sorted({b for _, b in table})


def format_table(table: dict[tuple[str, int], Cell], what: str = "accuracy") -> str:
    """Markdown table, methods x budgets: accuracy [95 % Wilson interval] (``what="accuracy"``;
    failed runs as "(k err)"), or mean ``tokens`` / ``compute`` / ``wall_s`` / ``reward_calls`` /
    ``coverage`` per problem."""
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
                text = f"{c.accuracy:.3f} [{c.lo:.2f}, {c.hi:.2f}]"
            else:
                text = f"{getattr(c, what):.3g}"
            if what == "accuracy" and c.errors:
                text += f" ({c.errors} err)"
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n = "/".join(map(str, sorted({c.n for c in table.values()})))
    lines.append(f"\n{n} problems per cell" + ("; [95 % Wilson score interval]." if what == "accuracy" else "; means per problem."))
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
                 "reward, majority: by frequency, BoM: Best-of-Majority; samples: unbiased pass@k of the candidates, "
                 "when rows carry candidate_correct); means over problems.")
    return "\n".join(lines)


# --- statistics -----------------------------------------------------------------------------

Z95 = 1.959963984540054   # the 97.5 % quantile of the standard normal


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95 % by default) of a proportion ``successes / n``;
    (nan, nan) when n = 0. Unlike the Wald interval it is never empty at 0 or n."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """The exact McNemar p-value: a two-sided binomial test (p = 1/2) on the discordant
    pairs, ``only_a`` problems right by A only and ``only_b`` by B only; 1 when there are none."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_bootstrap_ci(diffs: Sequence[float], resamples: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences, resampling problems
    (``resamples`` times, seeded); (nan, nan) for no pairs."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // d.size)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Paired:
    """Method A against method B at one budget, on the problems both graded."""
    budget: int
    n: int               # paired problems
    acc_a: float
    acc_b: float
    diff: float          # mean of correct_A - correct_B
    ci: tuple[float, float]   # paired bootstrap CI of diff
    only_a: int          # discordant: A right, B wrong
    only_b: int          # discordant: B right, A wrong
    p_value: float       # exact McNemar


def compare_methods(rows: Iterable[dict[str, Any]], a: str, b: str, resamples: int = 2000,
                    seed: int = 0) -> list[Paired]:
    """Paired comparison of methods ``a`` and ``b`` (names as in the rows) on the rows of one
    settings group, per budget both ran: only problems graded by both (no error row) count."""
    rows = list(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in (a, b):
        if m not in methods:
            raise ValueError(f"no rows of method {m!r} to compare; the methods are: {', '.join(methods)}")
    if a == b:
        raise ValueError(f"--compare needs two different methods, got {a!r} twice")
    graded: dict[tuple[str, int], dict[Any, bool]] = defaultdict(dict)
    for r in rows:
        if r.get("error") is None and isinstance(r.get("correct"), bool):
            graded[(r["method"], int(r["budget"]))][r["problem_id"]] = r["correct"]
    out = []
    budgets = sorted({int(r["budget"]) for r in rows if r["method"] == a} & {int(r["budget"]) for r in rows
                                                                          if r["method"] == b})
    for n_budget in budgets:
        ga, gb = graded.get((a, n_budget), {}), graded.get((b, n_budget), {})
        common = [p for p in ga if p in gb]
        xa = np.array([ga[p] for p in common], dtype=float)
        xb = np.array([gb[p] for p in common], dtype=float)
        d = xa - xb
        nan = float("nan")
        out.append(Paired(n_budget, len(common), float(xa.mean()) if common else nan,
                          float(xb.mean()) if common else nan, float(d.mean()) if common else nan,
                          paired_bootstrap_ci(d, resamples, seed), int(np.sum(d > 0)), int(np.sum(d < 0)),
                          mcnemar_exact(int(np.sum(d > 0)), int(np.sum(d < 0)))))
    return out


def format_comparison(pairs: Sequence[Paired], a: str, b: str, resamples: int = 2000) -> str:
    lines = [f"**{a}** vs **{b}** (paired on the problems both graded)", "",
             "| N | paired problems | acc A | acc B | A − B | 95 % bootstrap CI | A only right | B only right "
             "| McNemar p |", "|---|---|---|---|---|---|---|---|---|"]
    for p in pairs:
        if p.n == 0:
            lines.append(f"| {p.budget} | 0 | | | | | | | |")
            continue
        lines.append(f"| {p.budget} | {p.n} | {p.acc_a:.3f} | {p.acc_b:.3f} | {p.diff:+.3f} | "
                     f"[{p.ci[0]:+.3f}, {p.ci[1]:+.3f}] | {p.only_a} | {p.only_b} | {p.p_value:.3g} |")
    if not pairs:
        lines.append("| (no budget that both ran) | | | | | | | | |")
    lines.append(f"\nA = {a}, B = {b}; CI: paired bootstrap over problems ({resamples} resamples, seeded); "
                 "p: exact McNemar (two-sided binomial test on the discordant pairs).")
    return "\n".join(lines)


@dataclass(frozen=True)
class CoverageFit:
    """c(k) = exp(-a k^-b), fitted to log(-log c) = log a - b log k; ``a`` is None for no fit."""
    a: float | None
    b: float | None
    points: int          # the k with 0 < c < 1 the fit used
    k_max: int           # the largest measured k
    k_extra: int         # where it is extrapolated (4 k_max)
    c_extra: float | None
    reason: str = ""     # why there is no fit

    def __call__(self, k: float) -> float:
        if self.a is None:
            raise ValueError(f"no fit ({self.reason})")
        return float(math.exp(-self.a * k ** -self.b))


def fit_coverage(coverage: dict[int, float], extrapolate: int = 4) -> CoverageFit:
    """Large Language Monkeys fit of coverage c(k) (mean pass@k): least squares of
    log(-log c) on log k over the k with 0 < c < 1; extrapolated to ``extrapolate`` x the
    largest measured k. Fewer than 2 usable (distinct) k give "no fit", never an error."""
    ks = sorted(int(k) for k in coverage)
    k_max = ks[-1] if ks else 0
    use = [(k, float(coverage[k])) for k in ks if k > 0 and 0 < float(coverage[k]) < 1]
    if len(use) < 2:
        why = "all c in {0, 1}" if ks and len(use) == 0 else f"{len(use)} point(s) with 0 < c < 1"
        return CoverageFit(None, None, len(use), k_max, extrapolate * k_max, None, why)
    x = np.log([k for k, _ in use])
    y = np.log(-np.log([c for _, c in use]))
    slope, intercept = np.polyfit(x, y, 1)
    a, b = float(np.exp(intercept)), float(-slope)
    k_extra = extrapolate * k_max
    return CoverageFit(a, b, len(use), k_max, k_extra, float(math.exp(-a * k_extra ** -b)))


def coverage_table(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], dict[tuple[str, int], tuple[float, int]]]:
    """{(method, budget): {(rule, k): (mean pass@k, problems)}}: the rows' ``pass_at_k``
    columns (``pass_at_k_table``) and, for rows with a per-candidate ``candidate_correct``
    list of bools, rule "samples": the unbiased pass@k over the candidates (k = 1, 2, 4, ..., n)."""
    from ppl_scaling.metrics import pass_at_k

    rows = list(rows)
    table = pass_at_k_table(rows)
    acc: dict[tuple[str, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        hits = r.get("candidate_correct")
        if r.get("error") is not None or not isinstance(hits, list) or not hits \
                or not all(isinstance(h, bool) for h in hits):
            continue
        n, c = len(hits), sum(hits)
        k = 1
        while k <= n:
            acc[(r["method"], int(r["budget"]))][k].append(pass_at_k(n, c, k))
            k *= 2
    for cell, by_k in acc.items():
        table.setdefault(cell, {}).update({("samples", k): (float(np.mean(v)), len(v)) for k, v in by_k.items()})
    return table


def format_coverage_fits(table: dict[tuple[str, int], dict[tuple[str, int], tuple[float, int]]],
                         extrapolate: int = 4) -> str:
    """Markdown table of the power-law fit of each (method, budget, rule)'s coverage."""
    lines = ["| method | N | rule | a | b | points | c(k_max) | c extrapolated |", "|---|---|---|---|---|---|---|---|"]
    order = list(dict.fromkeys(m for m, _ in table))
    for (m, nb) in sorted(table, key=lambda mb: (order.index(mb[0]), mb[1])):
        by = table[(m, nb)]
        for rule in dict.fromkeys(r for r, _ in by):
            cov = {k: v for (r, k), (v, _) in by.items() if r == rule}
            fit = fit_coverage(cov, extrapolate)
            measured = f"{cov[fit.k_max]:.3f} (k={fit.k_max})"
            name = PASS_RULE_NAMES.get(rule, rule)
            if fit.a is None:
                lines.append(f"| {m} | {nb} | {name} | no fit ({fit.reason}) | | {fit.points} | {measured} | |")
            else:
                lines.append(f"| {m} | {nb} | {name} | {fit.a:.3g} | {fit.b:.3g} | {fit.points} | {measured} | "
                             f"{fit.c_extra:.3f} (k={fit.k_extra}) |")
    lines.append(f"\nCoverage c(k) = exp(-a k^-b) (Large Language Monkeys), least squares of log(-log c) on log k "
                 f"over the k with 0 < c < 1; extrapolated to {extrapolate}x the largest measured k.")
    return "\n".join(lines)


def _level_key(v: Any) -> tuple:
    return (0, float(v), "") if _is_number(v) else (1, 0.0, str(v))


def level_table(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int], dict[Any, tuple[int, int]]]:
    """{(method, budget): {level: (right, graded)}} over the graded rows with a ``difficulty``
    ({} when no row has one)."""
    out: dict[tuple[str, int], dict[Any, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in rows:
        level = r.get("difficulty")
        if r.get("error") is not None or level is None or isinstance(level, (dict, list)):
            continue
        cell = out[(r["method"], int(r["budget"]))][level]
        cell[0] += bool(r["correct"])
        cell[1] += 1
    return {mb: {lv: (c[0], c[1]) for lv, c in by.items()} for mb, by in out.items()}


def format_levels(table: dict[tuple[str, int], dict[Any, tuple[int, int]]]) -> str:
    levels = sorted({lv for by in table.values() for lv in by}, key=_level_key)
    lines = ["| method | N | " + " | ".join(f"level {lv}" for lv in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    order = list(dict.fromkeys(m for m, _ in table))
    for (m, nb) in sorted(table, key=lambda mb: (order.index(mb[0]), mb[1])):
        cells = []
        for lv in levels:
            if lv not in table[(m, nb)]:
                cells.append("")
                continue
            right, n = table[(m, nb)][lv]
            lo, hi = wilson(right, n)
            cells.append(f"{right / n:.3f} [{lo:.2f}, {hi:.2f}] (n={n})")
        lines.append(f"| {m} | {nb} | " + " | ".join(cells) + " |")
    lines.append("\nAccuracy per difficulty level [95 % Wilson score interval] (n: graded problems).")
    return "\n".join(lines)


def format_compute_table(table: dict[tuple[str, int], Cell]) -> str:
    """Markdown table: accuracy against compute, per method and budget (mean tokens per problem)."""
    methods, _ = _methods_budgets(table)
    lines = ["| method | N | generated tokens | reward tokens | total tokens | accuracy [95 % CI] |",
             "|---|---|---|---|---|---|"]
    for m in methods:
        for nb in sorted(b for mm, b in table if mm == m):
            c = table[(m, nb)]
            acc = "—" if c.n == 0 else f"{c.accuracy:.3f} [{c.lo:.2f}, {c.hi:.2f}]"
            lines.append(f"| {m} | {nb} | {c.tokens:.4g} | {c.reward_tokens:.4g} | {c.compute:.4g} | {acc} |")
    lines.append("\nAccuracy against compute: mean tokens per graded problem (generated + reward-model tokens).")
    return "\n".join(lines)


def plot_scaling(rows: Sequence[dict[str, Any]], path: str | Path | None = None, axes: Any = None) -> Any:
    """Two panels: accuracy vs budget N and accuracy vs compute, the mean tokens per problem
    (generated + reward-model tokens) (log-scale x, 95 % Wilson intervals). Rows of several settings are drawn as separate
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
            se = np.array([[c.accuracy - c.lo for _, c in cells], [c.hi - c.accuracy for _, c in cells]])
            tok = np.array([max(c.compute, 1.0) for _, c in cells])
            label = m if len(groups) == 1 else f"{m} [{gi}]"
            axes[0].errorbar(b, acc, yerr=se, marker="o", capsize=2, label=label)
            axes[1].errorbar(tok, acc, yerr=se, marker="o", capsize=2, label=label)
    axes[0].set(xscale="log", xlabel="budget N (particles / samples)", ylabel="accuracy", title="Accuracy vs budget",
                xticks=sorted(budgets))
    axes[0].xaxis.set_major_formatter(ScalarFormatter())
    axes[1].set(xscale="log", xlabel="tokens per problem (generated + reward)", ylabel="accuracy",
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


def report(path: str | Path, plot: str | Path | None = None, compare: Sequence[tuple[str, str]] | None = None,
           resamples: int = 2000, seed: int = 0) -> str:
    """The text report of a results file: what was skipped, then per settings group the
    accuracy (95 % Wilson intervals, error counts), accuracy against compute and wall time
    tables, per-level accuracy (rows with ``difficulty``), pass@k and its coverage fits, and the
    paired comparisons ``compare`` ([(A, B)], method names; bootstrap with ``resamples``
    and ``seed``; a pair may be given as "A,B"); draws the plot."""
    res = read_results(path)
    groups = res.by_group()
    compare = [tuple(m.strip() for m in ab.split(",")) if isinstance(ab, str) else tuple(ab) for ab in compare or []]
    every = list(dict.fromkeys(r["method"] for r in res.rows))
    for ab in compare:
        if len(ab) != 2:
            raise ValueError(f"--compare takes two method names A,B (e.g. particle_filtering,best_of_n), "
                             f"got {','.join(ab)!r}")
        if ab[0] == ab[1]:
            raise ValueError(f"--compare needs two different methods, got {ab[0]!r} twice")
        for m in ab:
            if m not in every:
                raise ValueError(f"--compare: no rows of method {m!r} in {path}; its methods are: {', '.join(every)}")
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
        section = [format_table(table), format_compute_table(table), format_table(table, "wall_s")]
        levels = level_table(rows)
        if levels:
            section.append(format_levels(levels))
        fell = sorted({(r["method"], int(r["budget"]), str(r["fallback"])) for r in rows
                       if r.get("error") is None and r.get("fallback")})
        if fell:
            section.append("note: budgets too small for the method ran a fallback instead (see the rows' "
                           "'fallback'): " + ", ".join(f"{m} at N={b} ran {f}" for m, b, f in fell))
        passes = coverage_table(rows)
        if passes:
            section.append(format_pass_at_k(passes))
            section.append(format_coverage_fits(passes))
        present = {r["method"] for r in rows}
        for a, b in compare:
            if a in present and b in present:
                section.append(format_comparison(compare_methods(rows, a, b, resamples, seed), a, b, resamples))
            else:
                section.append(f"note: no comparison of {a} and {b} here (the rows of these settings lack "
                               f"{' and '.join(m for m in (a, b) if m not in present)})")
        section.insert(0, f"## [{gi}] {_heading(g, res.groups.get(g), differing)}" if len(groups) > 1
                       else f"## {_heading(g, res.groups.get(g), differing)}")
        parts.extend(section)
    if plot is not None:
        plot_scaling(res.rows, plot)
        parts.append(f"plot written to {plot}")
    return "\n\n".join(parts)
