"""Answer selection, pass@k and resumable result files."""
import math

import numpy as np
import pytest

from ppl_scaling import aggregate
from ppl_scaling.jsonl import ResultsFile
from ppl_scaling.metrics import coverage_curve, pass_at_k


def test_selectors():
    answers = ["7", "3", "7", None, " 3", "5"]
    lw = np.log([0.1, 0.3, 0.1, 0.9, 0.25, 0.35])
    assert aggregate.majority_vote(answers) in ("7", "3")
    assert aggregate.majority_vote(["7", "3", "7"]) == "7"
    assert aggregate.argmax_weight(answers, lw) == "5"  # None is never chosen
    assert aggregate.weighted_majority(answers, lw).strip() == "3"  # 0.55 vs 0.2 vs 0.35
    assert aggregate.best_of_majority(["1", "1", "2", "3"], [0.1, 0.2, 0.9, 0.8], min_share=0.5) == "1"
    assert aggregate.best_of_majority(["1", "1", "2", "3"], [0.1, 0.2, 0.9, 0.8], min_share=0.2) == "2"
    assert aggregate.majority_vote([None, None]) is None
    assert aggregate.weighted_majority(["a", "b"], [-np.inf, -np.inf]) in ("a", "b")
    assert aggregate.weighted_majority(["1.0", "1"], [0.0, 0.0], key=float) == "1.0"


def test_pass_at_k_matches_the_combinatorial_definition():
    for n, c, k in [(16, 3, 1), (16, 3, 4), (10, 0, 5), (10, 10, 1), (20, 7, 20), (5, 2, 4)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="at least 8 samples"):
        pass_at_k(4, 1, 8)
    assert coverage_curve([4, 4], [0, 4], [1, 2]) == {1: 0.5, 2: 0.5}


def test_results_file_resumes_and_drops_a_truncated_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsFile(path, key=("id", "method"), settings={"seed": 0}) as out:
        out.write({"id": 1, "method": "a", "correct": True})
        out.write({"id": 2, "method": "a", "correct": False})
        with pytest.raises(ValueError, match="already holds a row"):
            out.write({"id": 2, "method": "a", "correct": True})
    with open(path, "a") as fh:
        fh.write('{"id": 3, "meth')  # killed mid-write
    again = ResultsFile(path, key=("id", "method"), settings={"seed": 0})
    assert again.repaired and "incomplete last record" in again.repaired
    assert again.done({"id": 2, "method": "a"}) and not again.done({"id": 3, "method": "a"})
    again.write({"id": 3, "method": "a", "correct": True})
    again.replace({"id": 1, "method": "a", "correct": False})
    again.close()
    reread = ResultsFile(path, key=("id", "method"))
    assert [(r["id"], r["correct"]) for r in reread.rows] == [(1, False), (2, False), (3, True)]
    assert reread.settings == {"seed": 0} and all(r["settings_id"] == reread.settings_id for r in reread.rows)
    reread.close()
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1], "not json", lines[2]]) + "\n")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="r.jsonl'?:3: not a valid JSON record"):
        ResultsFile(path, key=("id", "method"))
    assert path.read_bytes() == before


# ----------------------------------------------------------------------- Best-of-Majority, pass@k of every rule

def brute_force_top_k(answers, scores, k, rule, min_share):
    """The rule's k submissions by enumeration: every set of at most k distinct eligible answers,
    the one whose submissions rank highest (by the rule's score of each answer, sorted)."""
    import itertools

    valid = [a for a in answers if a is not None]
    distinct = list(dict.fromkeys(valid))
    count = {a: valid.count(a) for a in distinct}
    best = {a: max(s for b, s in zip(answers, scores) if b == a) for a in distinct}
    if rule == "majority_vote":
        eligible, value = distinct, (lambda a: (count[a], -answers.index(a)))
    else:
        eligible = distinct if rule == "argmax_reward" else [a for a in distinct if count[a] >= min_share * len(valid)]
        if not eligible and distinct:   # BoM: nothing frequent enough -> the most frequent answer
            eligible = [max(distinct, key=lambda a: (count[a], -answers.index(a)))]
        value = lambda a: (best[a], -answers.index(a))  # noqa: E731
    size = min(k, len(eligible))
    chosen = max(itertools.combinations(eligible, size), key=lambda c: sorted(map(value, c), reverse=True))
    return set(chosen)


def test_top_k_of_every_rule_matches_brute_force_on_enumerable_candidates():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 9))
        answers = [None if u < 0.1 else str(int(v)) for u, v in zip(rng.random(n), rng.integers(0, 4, n))]
        scores = rng.standard_normal(n)   # distinct: no ties in the brute force
        gold = str(int(rng.integers(0, 4)))
        correct = [a == gold for a in answers]
        min_share = float(rng.choice([0.0, 0.2, 0.3, 0.5, 0.9]))
        for k in (1, 2, 3, 5):
            table = aggregate.pass_at_k_rules(answers, correct, scores, [k], min_share=min_share)
            for rule in aggregate.TOP_K_RULES:
                picked = aggregate.top_k(rule, answers, scores, k, min_share=min_share)
                assert len(picked) == len(set(picked)) <= k
                expect = brute_force_top_k(answers, scores, k, rule, min_share)
                assert set(picked) == expect, (trial, rule, k, answers, scores, min_share)
                assert table[rule][k] == (gold in expect)


def test_best_of_majority_with_k_submissions_and_the_threshold():
    answers = ["1", "1", "1", "2", "2", "3", None, "4"]
    scores = [0.1, 0.2, 0.3, 0.9, 0.5, 0.95, 0.99, 0.7]
    # frequencies among the 7 answered: 1 -> 3/7, 2 -> 2/7, 3 -> 1/7, 4 -> 1/7
    assert aggregate.best_of_majority(answers, scores) == "2"                     # k = 1, min_share = 0.2
    assert aggregate.best_of_majority_k(answers, scores, 1) == ["2"]
    assert aggregate.best_of_majority_k(answers, scores, 3) == ["2", "1"]          # only two reach 0.2
    assert aggregate.best_of_majority_k(answers, scores, 4, min_share=0.0) == ["3", "2", "4", "1"]  # = BoN
    assert aggregate.top_k("argmax_reward", answers, scores, 4) == ["3", "2", "4", "1"]
    assert aggregate.best_of_majority_k(answers, scores, 2, min_share=0.4) == ["1"]  # the majority only
    assert aggregate.best_of_majority_k(answers, scores, 2, min_share=0.9) == ["1"]  # none: the most frequent
    assert aggregate.top_k("majority_vote", answers, None, 2) == ["1", "2"]
    assert aggregate.best_of_majority_k([None, None], [0.0, 0.0], 2) == [] and \
        aggregate.best_of_majority([None], [0.0]) is None
    ok = aggregate.pass_at_k_rules(answers, [a == "3" for a in answers], scores, [1, 4])
    assert ok == {"argmax_reward": {1: True, 4: True}, "majority_vote": {1: False, 4: True},
                  "best_of_majority": {1: False, 4: False}}
    assert aggregate.pass_at_k_rules(answers, [False] * 8, None, [1])["best_of_majority"] == {1: None}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            aggregate.top_k("majority_vote", answers, None, bad)
    with pytest.raises(ValueError, match="threshold"):
        aggregate.best_of_majority_k(answers, scores, 1, min_share=1.5)
    with pytest.raises(ValueError, match="rules"):
        aggregate.top_k("weighted_majority", answers, scores, 1)


def test_select_with_k_submissions_reads_the_methods_threshold():
    from ppl_scaling.result import SMCResult

    answers = ["1", "1", "1", "2", "2", "3", None, "4"]
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.5, 0.95, 0.99, 0.7])
    res = SMCResult(particles=np.zeros(8), log_weights=np.zeros(8), log_evidence=0.0, ess=np.ones(1),
                    resampled=np.zeros(1, bool), log_evidence_increments=np.zeros(1), rewards=scores,
                    info={"selection_rule": "best_of_majority", "min_share": 0.4})
    assert res.select(answers) == "1" and res.select(answers, min_share=0.2) == "2"
    assert res.select(answers, k=2, min_share=0.2) == ["2", "1"]
    assert res.select(answers, "argmax_reward", k=2) == ["3", "2"]
    with pytest.raises(ValueError, match="k submissions need"):
        res.select(answers, "weighted_majority", k=2)
