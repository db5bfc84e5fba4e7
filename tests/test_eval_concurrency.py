"""`ppl-scaling eval --concurrency K` writes the rows of `--concurrency 1` (wall time aside), keeps
completions, isolates a failing run, and resumes."""
from __future__ import annotations

import json

from ppl_scaling.cli import main
from ppl_scaling.models import evaluate as ev

ARGS = ["eval", "--methods", "particle_filtering,best_of_n,self_consistency,beam_search", "--budgets", "2,4",
        "--no-progress", "--save-completions"]


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in path.read_text().splitlines()[1:]]


def key(r):
    return (r["problem_id"], r["method"], r["budget"])


def test_lockstep_rows_equal_one_at_a_time(tmp_path):
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    assert main([*ARGS, "--problems", "3", "--out", str(one), "--concurrency", "1"]) == 0
    assert main([*ARGS, "--problems", "3", "--out", str(many), "--concurrency", "5"]) == 0
    assert sorted(rows(many), key=key) == sorted(rows(one), key=key)
    saved = [ev.completions_path(p) for p in (one, many)]
    assert sorted(rows(saved[1]), key=key) == sorted(rows(saved[0]), key=key)
    # resume under lockstep: more problems, the first three untouched
    before = rows(many)
    assert main([*ARGS, "--problems", "4", "--out", str(many), "--concurrency", "5"]) == 0
    after = rows(many)
    assert after[:len(before)] == before and len(after) == 4 * 4 * 2


def test_a_failing_run_is_isolated_under_lockstep(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "ok", "problem": "Q:3+4", "answer": "7"}\n'
                    '{"id": "long", "problem": "Q:' + "+".join(["1"] * 60) + '", "answer": "60"}\n')
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--dataset", str(data), "--methods", "self_consistency,best_of_n", "--budgets", "2",
                 "--concurrency", "4", "--out", str(out), "--no-progress"]) == 1
    by = {key(r): r for r in rows(out)}
    assert all(by[("ok", m, 2)]["correct"] is not None for m in ("self_consistency", "best_of_n"))
    assert all(by[("long", m, 2)]["error_type"] == "ContextLengthError" for m in ("self_consistency", "best_of_n"))
    assert "run failed: problem long" in capsys.readouterr().err
