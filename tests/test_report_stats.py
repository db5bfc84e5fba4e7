"""The report's statistics: Wilson intervals, exact McNemar, the paired bootstrap, the
coverage power-law fit, per-level tables and `ppl-scaling report --compare` end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ppl_scaling.cli import main
from ppl_scaling.jsonl import settings_id
from ppl_scaling.models.report import (accuracy_table, compare_methods, coverage_table, fit_coverage, format_table,
                                       mcnemar_exact, paired_bootstrap_ci, read_results, report, wilson)

Z = 1.959963984540054


def test_wilson_matches_the_closed_form_and_never_collapses():
    z2 = Z * Z
    lo, hi = wilson(0, 10)          # 0/10: [0, z^2 / (n + z^2)]
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(10, 10)         # 10/10: [n / (n + z^2), 1]
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z2), abs=1e-12) and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson(5, 10)          # symmetric about 1/2: 0.2366 .. 0.7634 (textbook value)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert lo + hi == pytest.approx(1.0)
    lo, hi = wilson(8, 20)          # general closed form
    p = 0.4
    c = (p + z2 / 40) / (1 + z2 / 20)
    h = Z * math.sqrt(p * (1 - p) / 20 + z2 / 1600) / (1 + z2 / 20)
    assert (lo, hi) == pytest.approx((c - h, c + h), abs=1e-12)
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(3, 2)


@pytest.mark.parametrize("only_a,only_b", [(0, 0), (0, 1), (1, 0), (3, 9), (9, 3), (5, 5), (0, 12), (17, 40),
                                           (200, 260), (1, 1)])
def test_mcnemar_is_scipys_two_sided_binomial_test(only_a, only_b):
    scipy_stats = pytest.importorskip("scipy.stats")
    n = only_a + only_b
    expected = 1.0 if n == 0 else scipy_stats.binomtest(only_a, n, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_paired_bootstrap_ci_covers_the_true_difference_and_is_seeded():
    rng = np.random.default_rng(1)
    n = 400
    skill = rng.uniform(0, 1, n)                     # per-problem difficulty shared by both methods
    a = rng.uniform(0, 1, n) < np.clip(skill + 0.10, 0, 1)
    b = rng.uniform(0, 1, n) < skill
    true = float(np.mean(np.clip(skill + 0.10, 0, 1) - skill))
    d = a.astype(float) - b.astype(float)
    lo, hi = paired_bootstrap_ci(d, 2000, seed=0)
    assert lo < true < hi and lo < d.mean() < hi and hi - lo < 0.2
    assert paired_bootstrap_ci(d, 2000, seed=0) == (lo, hi)       # seeded: reproducible
    covered = 0                                                     # and about 95 % coverage over replications
    for rep in range(40):
        r = np.random.default_rng(100 + rep)
        x = (r.uniform(0, 1, 200) < 0.6).astype(float) - (r.uniform(0, 1, 200) < 0.5).astype(float)
        lo, hi = paired_bootstrap_ci(x, 500, seed=rep)
        covered += lo <= 0.1 <= hi
    assert covered >= 33
    assert all(math.isnan(v) for v in paired_bootstrap_ci([], 100))


def test_power_law_fit_recovers_a_and_b():
    for a, b in [(2.0, 0.5), (0.7, 1.3), (5.0, 0.2)]:
        cov = {k: math.exp(-a * k ** -b) for k in (1, 2, 4, 8, 16)}
        fit = fit_coverage(cov)
        assert abs(fit.a - a) < 1e-6 and abs(fit.b - b) < 1e-6 and fit.points == 5
        assert fit.k_extra == 64 and abs(fit.c_extra - math.exp(-a * 64 ** -b)) < 1e-6
        assert abs(fit(3) - math.exp(-a * 3 ** -b)) < 1e-6
    # points with c in {0, 1} are left out of the fit, not an error
    fit = fit_coverage({1: 0.0, 2: math.exp(-2 * 2 ** -0.5), 4: math.exp(-2 * 4 ** -0.5), 8: 1.0})
    assert fit.points == 2 and abs(fit.a - 2) < 1e-6 and abs(fit.b - 0.5) < 1e-6
    for degenerate in ({1: 0.0, 2: 1.0, 4: 1.0}, {1: 0.5}, {}, {1: 0.3, 2: 1.0}):
        fit = fit_coverage(degenerate)
        assert fit.a is None and fit.c_extra is None and fit.reason
        with pytest.raises(ValueError, match="no fit"):
            fit(2)


# --- a results file written by hand, in the format `evaluate` writes ------------------------------

SETTINGS = {"task": "math", "dataset": "toy.jsonl", "model": "m", "prm": "p", "seed": 0, "temperature": 0.8}
SID = settings_id(SETTINGS)


def _row(pid, method, budget, correct, level=None, hits=None, **kw):
    row = {"problem_id": pid, "method": method, "budget": budget, "answer": "1" if correct else "2", "gold": "1",
           "correct": correct, "tokens": 100 * budget, "prefill_tokens": 10, "forward_passes": 5 * budget,
           "reward_calls": budget, "reward_tokens": 20 * budget, "nfe": 0, "wall_s": 0.5,
           "any_correct": bool(correct), "frac_correct": 0.5, "num_answers": 2, "grading_timeouts": 0,
           "log_evidence": None, "final_ess": None, "resamplings": 0, "fallback": None,
           "pass_at_k": {"majority_vote": {str(k): v for k, v in (hits or {}).items()}},
           "difficulty": None, "settings_id": SID}
    if level is not None:
        row["difficulty"] = level
    return {**row, **kw}


def _error_row(pid, method, budget):
    return {"problem_id": pid, "method": method, "budget": budget, "gold": "1", "correct": None,
            "error": "context too long", "error_type": "ValueError", "error_where": "x.py:1", "settings_id": SID}


def write_results(path, levels=True):
    """20 problems; A = particle_filtering:majority_vote right on 0-13 (N=4) / 0-9 (N=1), B = best_of_n right on
    0-7 and 14-15 (N=4) / 0-9 (N=1); problem 19 of B at N=4 failed (an error row)."""
    header = {"ppl_scaling_results": 1, "settings_id": SID, "settings": SETTINGS, "info": {"version": "test"}}
    rows = []
    a, b = "particle_filtering:majority_vote", "best_of_n"
    for i in range(20):
        pid = f"test-{i:04d}"
        level = (i % 3) + 1 if levels else None
        hits = {1: i < 10, 2: i < 14, 4: i < 17} if i < 19 else {1: False, 2: False, 4: False}
        rows.append(_row(pid, a, 1, i < 10, level))
        rows.append(_row(pid, b, 1, i < 10, level))
        rows.append(_row(pid, a, 4, i < 14, level, hits=hits))
        rows.append(_error_row(pid, b, 4) if i == 19 else _row(pid, b, 4, i < 8 or 14 <= i < 16, level))
    path.write_text("".join(json.dumps(x) + "\n" for x in [header, *rows]))
    return a, b


def test_compare_methods_pairs_problems_and_skips_error_rows(tmp_path):
    a, b = write_results(tmp_path / "r.jsonl")
    rows = read_results(tmp_path / "r.jsonl").rows
    at1, at4 = compare_methods(rows, a, b, resamples=1000, seed=3)
    assert at1.budget == 1 and at1.n == 20 and at1.diff == 0 and at1.only_a == at1.only_b == 0 and at1.p_value == 1
    assert at1.ci == (0.0, 0.0)
    assert at4.budget == 4 and at4.n == 19                       # problem 19 failed for B: not paired
    assert (at4.only_a, at4.only_b) == (6, 2)                    # A only: 8..13; B only: 14, 15
    assert at4.diff == pytest.approx(4 / 19) and at4.acc_a == pytest.approx(14 / 19)
    assert at4.p_value == pytest.approx(mcnemar_exact(6, 2)) == pytest.approx(0.2890625)
    assert at4.ci[0] <= at4.diff <= at4.ci[1]
    with pytest.raises(ValueError, match="no rows of method 'nope'"):
        compare_methods(rows, a, "nope")


def test_tables_show_wilson_intervals_compute_levels_and_coverage(tmp_path):
    a, b = write_results(tmp_path / "r.jsonl")
    rows = read_results(tmp_path / "r.jsonl").rows
    table = accuracy_table(rows)
    cell = table[(b, 4)]
    assert cell.n == 19 and cell.errors == 1 and (cell.lo, cell.hi) == pytest.approx(wilson(10, 19))
    assert cell.compute == 400 + 80
    text = format_table(table)
    assert "±" not in text and f"| {a} | 0.500 [0.30, 0.70] | 0.700 [0.48, 0.85] |" in text
    cov = coverage_table(rows)[(a, 4)]
    assert cov[("majority_vote", 1)] == (0.5, 20) and cov[("majority_vote", 4)] == (0.85, 20)
    full = report(tmp_path / "r.jsonl")
    assert "total tokens" in full and f"| {a} | 4 | 400 | 80 | 480 | 0.700 [0.48, 0.85] |" in full
    assert "level 1" in full and "level 3" in full and "(n=7)" in full
    assert "c extrapolated" in full and "(k=16)" in full
    write_results(tmp_path / "plain.jsonl", levels=False)
    assert "level 1" not in report(tmp_path / "plain.jsonl")   # no `level`: no per-level table, no error


def test_candidate_correctness_gives_unbiased_pass_at_k():
    rows = [{"problem_id": i, "method": "m", "budget": 4, "correct": True, "candidate_correct": hits}
            for i, hits in enumerate([[True, False, False, False], [False] * 4, [True] * 4])]
    cov = coverage_table(rows)[("m", 4)]
    assert cov[("samples", 1)][0] == pytest.approx((0.25 + 0 + 1) / 3)
    assert cov[("samples", 2)][0] == pytest.approx((0.5 + 0 + 1) / 3) and cov[("samples", 4)][0] == pytest.approx(2 / 3)


def test_cli_report_compare_end_to_end(tmp_path, capsys):
    a, b = write_results(tmp_path / "r.jsonl")
    plot = tmp_path / "scaling.png"
    assert main(["report", str(tmp_path / "r.jsonl"), "--compare", f"{a},{b}", "--resamples", "500",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert f"**{a}** vs **{b}**" in out and "McNemar p" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("| 4 | 19 |"))
    assert "| +0.211 |" in line and "| 6 | 2 | 0.289 |" in line
    assert "| 1 | 20 | 0.500 | 0.500 | +0.000 | [+0.000, +0.000] | 0 | 0 | 1 |" in out
    assert plot.stat().st_size > 1000
    again = main(["report", str(tmp_path / "r.jsonl"), "--compare", f"{a},{b}", "--resamples", "500"])
    assert again == 0 and capsys.readouterr().out == out.replace(f"\n\nplot written to {plot}", "")  # seeded
    assert main(["report", str(tmp_path / "r.jsonl"), "--compare", f"{a},nope"]) == 2
    err = capsys.readouterr().err
    assert "no rows of method 'nope'" in err and b in err and err.count("\n") == 1
    assert main(["report", str(tmp_path / "r.jsonl"), "--compare", a]) == 2
    assert "two method names A,B" in capsys.readouterr().err
