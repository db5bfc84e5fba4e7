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
