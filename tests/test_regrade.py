"""`eval --save-completions` keeps every candidate; `regrade` rebuilds the rows from them without
the models (identical rows under the same grader), grades anew under another, resumes, and
refuses to overwrite its input."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ppl_scaling.cli import main
from ppl_scaling.models import evaluate as ev

METHODS = "particle_filtering,self_consistency,best_of_n:best_of_majority,beam_search"


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("regrade") / "results.jsonl"
    assert main(["eval", "--methods", METHODS, "--budgets", "1,4", "--problems", "4", "--out", str(out),
                 "--no-progress", "--save-completions"]) == 0
    return out


def test_saved_completions_hold_every_candidate(evaluated):
    header, *rows = lines(evaluated)
    saved_header, *records = lines(ev.completions_path(evaluated))
    assert ev.completions_path(evaluated).name == "results.completions.jsonl"
    assert saved_header["settings_id"] == header["settings_id"] and len(records) == len(rows) == 4 * 4 * 2
    by_run = {(r["problem_id"], r["method"], r["budget"]): r for r in records}
    for row in rows:
        rec = by_run[(row["problem_id"], row["method"], row["budget"])]
        n = len(rec["completions"])
        assert n == row["budget"] and len(rec["answers"]) == len(rec["log_weights"]) == len(rec["num_tokens"]) == n
        assert rec["answer"] == row["answer"] and rec["correct"] == row["correct"] and rec["gold"] == row["gold"]
        assert rec["prompt"].startswith("Q:") and rec["question"] == rec["prompt"]
        assert all(t > 0 for t in rec["num_tokens"]) and len(rec["ess"]) >= 1
    assert {r["selection_rule"] for r in records if r["method"] == "best_of_n:best_of_majority"} == {
        "best_of_majority"}


def test_regrade_without_models_gives_the_same_rows(evaluated, tmp_path, monkeypatch):
    def no_models(*a, **k):
        raise AssertionError("regrade must not load a model")

    monkeypatch.setattr(ev, "load_lm", no_models)
    monkeypatch.setattr(ev, "load_prm", no_models)
    out = tmp_path / "regraded.jsonl"
    assert main(["regrade", str(evaluated), "--out", str(out), "--no-progress"]) == 0
    (h0, *rows0), (h1, *rows1) = lines(evaluated), lines(out)
    assert h1["settings"] == h0["settings"] and h1["info"]["regraded_from"] == "results.jsonl"
    assert rows1 == rows0
    assert lines(ev.completions_path(out))[1:] == lines(ev.completions_path(evaluated))[1:]
    assert ev.regrade(evaluated, out, progress=False) == rows0           # resumed: nothing to redo


def test_regrade_under_another_grader_and_refusals(evaluated, tmp_path, capsys):
    task = ev.regrade_task(lines(evaluated)[0]["settings"])

    def off_by_one(answer, gold):   # a changed grader: the reference answer plus one is "right"
        return answer is not None and int(answer) == int(gold) + 1

    rows = ev.regrade(evaluated, tmp_path / "other.jsonl", task=dataclasses.replace(task, correct=off_by_one),
                      progress=False)
    saved = {(r["problem_id"], r["method"], r["budget"]): r for r in lines(ev.completions_path(evaluated))[1:]}
    for row in rows:
        rec = saved[(row["problem_id"], row["method"], row["budget"])]
        assert row["answer"] == rec["answer"]
        assert row["correct"] == (row["answer"] is not None and int(row["answer"]) == int(rec["gold"]) + 1)
    assert main(["regrade", str(evaluated), "--out", str(evaluated)]) == 2
    assert "would overwrite" in capsys.readouterr().err
    plain = tmp_path / "plain.jsonl"
    assert main(["eval", "--methods", "self_consistency", "--budgets", "1", "--problems", "1", "--out", str(plain),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["regrade", str(plain), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--save-completions" in capsys.readouterr().err


def test_resume_logs_skipped_runs_and_runs_without_saved_completions(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = ["eval", "--methods", "self_consistency", "--budgets", "1", "--problems", "2", "--out", str(out),
            "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main([*args, "--problems", "3", "--save-completions", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "2 of 3 runs are already done" in err and "2 finished runs have no saved completions" in err
    assert len(lines(ev.completions_path(out))) == 1 + 1
