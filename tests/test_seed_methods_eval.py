"""Every seed-paper method runs through `ppl-scaling eval` on the toy task (the bundled LM, the
learned PRM; verify_cascade escalates to the exact checker, deep_prune judges by running
totals) and through the report."""
from __future__ import annotations

import json

from ppl_scaling.cli import main

NEW = ("rpc", "first_finish", "multi_temperature", "a_star", "rejection_sampling", "verify_cascade", "deep_prune",
       "verifier_scaling")


def test_every_new_method_runs_through_eval_and_the_report(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--methods", ",".join(NEW), "--budgets", "4", "--problems", "2", "--out", str(out),
                 "--no-progress"]) == 0
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["method"] for r in rows} == set(NEW) and all(isinstance(r["correct"], bool) for r in rows)
    by = {(r["method"], r["problem_id"]): r for r in rows}
    assert all(by[("verify_cascade", p)]["reward_calls"] >= 1 for p in {r["problem_id"] for r in rows})
    assert header["settings"]["judge"] == "ppl_scaling.models.toy.same_predicted_answer"
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert all(m in text for m in NEW)
