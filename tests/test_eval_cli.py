"""`ppl-scaling eval | report | run` end to end on toy problems: rows, resume after
SIGINT with no duplicates and the same results, user datasets, clear errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppl_scaling.cli import main
from ppl_scaling.models import toy
from ppl_scaling.models.evaluate import KEY, arithmetic_task, evaluate, read_dataset, scaling_comparison
from ppl_scaling.models.report import accuracy_table, load_rows
from llm_fixtures import TOY_LM_PATH, prm_path, random_prm, toy_lm

MODELS = ["--model", str(TOY_LM_PATH), "--prm", str(prm_path())]
FIELDS = {"problem_id", "method", "budget", "answer", "gold", "correct", "tokens", "prefill_tokens", "forward_passes",
          "reward_calls", "reward_tokens", "wall_s", "any_correct", "frac_correct", "num_answers"}


def rows_of(path: Path) -> list[dict]:
    """The result rows of a results file (its first line is the settings header)."""
    header, *rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert "ppl_scaling_results" in header and isinstance(header["settings"], dict)
    return rows


def error_of(err: str) -> str:
    """The one error line of a failed command (other stderr lines are progress bars of the model loaders)."""
    (line,) = [ln for ln in err.splitlines() if ln.startswith("ppl-scaling: error: ")]
    assert err.rstrip("\n").endswith(line)
    return line


def header_of(path: Path) -> dict:
    return json.loads(path.read_text().splitlines()[0])


def test_eval_writes_one_row_per_run_and_resumes(tmp_path, capsys):
    dataset = toy.write_jsonl(toy.load_split("test")[:3], tmp_path / "toy.jsonl")
    out = tmp_path / "results.jsonl"
    args = ["eval", "--task", "arithmetic", "--dataset", str(dataset), "--methods",
            "particle_filtering,best_of_n,self_consistency", "--budgets", "1,4", "--out", str(out), "--no-progress"]
    assert main(args + MODELS) == 0
    rows = rows_of(out)
    assert len(rows) == 3 * 3 * 2 and all(FIELDS <= set(r) for r in rows)
    assert {r["problem_id"] for r in rows} == {"test-0000", "test-0001", "test-0002"}
    for r in rows:  # the ledger of each run
        assert r["tokens"] > 0 and r["forward_passes"] > 0 and r["wall_s"] > 0
        assert (r["reward_calls"] > 0) == (r["method"] != "self_consistency")
        if r["method"] == "best_of_n":
            assert r["reward_calls"] == r["budget"]   # one final score per sample
    assert "particle_filtering" in capsys.readouterr().out  # the accuracy table
    before = out.read_text()
    assert main(args + MODELS) == 0          # nothing left to do: the file is unchanged
    assert out.read_text() == before
    assert main(args + ["--seed", "1"] + MODELS) == 2   # other settings: refused, the file untouched
    err = error_of(capsys.readouterr().err)
    assert "other settings" in err and "seed: 0 in the file, 1 now" in err
    assert out.read_text() == before
    settings = header_of(out)["settings"]
    assert settings["seed"] == 0 and settings["task"] == "arithmetic" and settings["temperature"] == 1.0
    assert settings["model"].startswith("toy_lm@") and "/" not in settings["model"]   # no absolute path

    assert main(["report", str(out), "--plot", str(tmp_path / "scaling.png")]) == 0
    text = capsys.readouterr().out
    assert "| particle_filtering |" in text and (tmp_path / "scaling.png").stat().st_size > 1000


def test_sigint_loses_nothing_and_resume_equals_an_uninterrupted_run(tmp_path):
    out, ref = tmp_path / "results.jsonl", tmp_path / "reference.jsonl"
    methods, budgets = ["particle_filtering", "self_consistency"], [2, 6]
    cmd = [sys.executable, "-m", "ppl_scaling.cli", "eval", "--problems", "3", "--methods", ",".join(methods),
           "--budgets", "2,6", "--out", str(out), "--no-progress", *MODELS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            (not out.exists() or len(out.read_text().splitlines()) < 3):   # the header and 2 rows
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    partial = rows_of(out)
    assert 2 <= len(partial) < 12, "the interruption should land mid-run"

    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    rows = rows_of(out)
    keys = [tuple(r[k] for k in KEY) for r in rows]
    assert len(keys) == len(set(keys)) == 12
    assert rows[: len(partial)] == partial   # appended, never rewritten

    evaluate(arithmetic_task(3), toy_lm(), random_prm(), methods, budgets, ref, seed=0,
             model_name=str(TOY_LM_PATH), prm_name=str(prm_path()), progress=False)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("wall_s",)}  # noqa: E731
    assert sorted(map(strip, rows), key=str) == sorted(map(strip, rows_of(ref)), key=str)


def test_user_dataset_errors_and_missing_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "What is 1+1?", "answer": "2"}\n{"problem": "What is 2+2?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'answer'"):
        read_dataset(bad)
    assert main(["eval", "--task", "math", "--dataset", str(bad), "--methods", "self_consistency",
                 "--out", str(tmp_path / "r.jsonl"), "--model", str(TOY_LM_PATH)]) == 2
    assert "bad.jsonl:2: missing field 'answer'" in capsys.readouterr().err
    assert main(["eval", "--methods", "self_consistency", "--out", str(tmp_path / "r.jsonl"),
                 "--model", str(tmp_path / "no_such_model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppl-scaling: error: ") and err.count("\n") == 1 and "missing.jsonl" in err


def test_math_task_with_a_user_dataset_and_the_run_command(tmp_path, capsys):
    data = tmp_path / "math.jsonl"
    data.write_text('{"id": "a", "problem": "Q:3+4", "answer": "7"}\n')
    out = tmp_path / "r.jsonl"
    # the toy LM has no chat template and a 128-token context: the default system prompt
    # (prepended as plain text, never dropped) does not fit, and is refused in an error row
    assert main(["eval", "--task", "math", "--dataset", str(data), "--methods", "self_consistency", "--budgets", "2",
                 "--max-step-tokens", "24", "--out", str(out), "--no-progress", "--model", str(TOY_LM_PATH)]) == 1
    assert "exceeds the context length" in rows_of(out)[0]["error"]
    out = tmp_path / "r2.jsonl"
    assert main(["eval", "--task", "math", "--dataset", str(data), "--methods", "self_consistency", "--budgets", "2",
                 "--max-step-tokens", "24", "--out", str(out), "--no-progress", "--model", str(TOY_LM_PATH),
                 "--system-prompt", ""]) == 0
    (row,) = rows_of(out)
    assert row["problem_id"] == "a" and row["tokens"] > 0 and isinstance(row["correct"], bool)
    assert row["grading_timeouts"] == 0
    settings = header_of(out)["settings"]
    assert settings["task"] == "math" and settings["system_prompt"] is None and settings["grading_timeout_s"] == 5.0
    assert settings["max_step_tokens"] == 24 and settings["chat_template"] is None

    assert main(["run", "--prompt", "24+5-4", "--budget", "4", "--method", "particle_filtering", *MODELS]) == 0
    text = capsys.readouterr().out
    assert "answer" in text and "tokens" in text


def test_scaling_comparison_writes_table_and_plot(tmp_path):
    """With the bundled LM and learned PRM (the defaults)."""
    res = scaling_comparison(tmp_path, problems=2, budgets=(1, 2), methods=("self_consistency", "best_of_n"),
                             progress=False)
    assert res["rows"] == 2 * 2 * 2
    assert (tmp_path / "scaling.png").exists() and "self_consistency" in (tmp_path / "scaling.md").read_text()
    assert set(accuracy_table(load_rows(tmp_path / "scaling.jsonl"))) == {
        (m, b) for m in ("self_consistency", "best_of_n") for b in (1, 2)}


def test_rows_record_diagnostics_fallback_and_pass_at_k_of_every_rule(tmp_path, capsys):
    """`eval --methods best_of_majority` works; every row has log Z (null for search methods),
    the final ESS, the resamplings, a fallback (PG on N = 2) and pass@k of BoN / majority / BoM,
    consistent with the row's own candidates; `report` shows the pass@k table."""
    dataset = toy.write_jsonl(toy.load_split("test")[:2], tmp_path / "toy.jsonl")
    out = tmp_path / "results.jsonl"
    args = ["eval", "--task", "arithmetic", "--dataset", str(dataset), "--methods",
            "best_of_majority,particle_filtering,particle_gibbs,beam_search,self_consistency", "--budgets", "2,4",
            "--out", str(out), "--no-progress"]
    assert main(args + MODELS) == 0
    rows = rows_of(out)
    assert len(rows) == 2 * 5 * 2 and not any(r.get("error") for r in rows)
    for r in rows:
        assert {"log_evidence", "final_ess", "resamplings", "fallback", "pass_at_k"} <= set(r)
        assert 0 < r["final_ess"] <= r["budget"] and isinstance(r["resamplings"], int) and r["resamplings"] >= 0
        if r["method"] == "beam_search" or (r["method"] == "particle_gibbs" and r["fallback"] is None):
            assert r["log_evidence"] is None   # a search, a Markov chain: no evidence (NaN written as null)
        else:
            assert isinstance(r["log_evidence"], float)
        if r["method"] in ("best_of_majority", "self_consistency"):
            assert r["resamplings"] == 0
        assert r["fallback"] == ("particle_filtering" if r["method"] == "particle_gibbs" and r["budget"] < 4 else None)
        p = r["pass_at_k"]
        assert set(p) == {"argmax_reward", "majority_vote", "best_of_majority"}
        ks = {"1", "2"} | ({"4"} if r["budget"] == 4 and r["method"] != "particle_gibbs" else set())
        assert all(set(by_k) == ks for by_k in p.values())   # k up to the number of candidates (PG: N // sweeps)
        if r["method"] == "self_consistency":
            assert p["argmax_reward"]["1"] is None and p["best_of_majority"]["1"] is None
        for rule, by_k in p.items():
            done = [v for _, v in sorted(by_k.items(), key=lambda kv: int(kv[0])) if v is not None]
            assert done == sorted(done) and (not done or done[-1] <= r["any_correct"])   # monotone in k
        if r["method"] == "best_of_majority":
            assert p["best_of_majority"]["1"] == r["correct"]   # its own answer is the rule's first submission
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "BoN pass@1" in text and "BoM pass@2" in text and "majority pass@4" in text
    assert "| best_of_majority | 2 |" in text
    assert "particle_gibbs at N=2 ran particle_filtering" in text and "at N=4" not in text


def test_math_eval_on_a_bundled_gsm8k_fixture_keeps_difficulty_and_subject(tmp_path, capsys):
    """`eval --task math --dataset tests/fixtures/gsm8k.jsonl` end to end on the toy LM; a MATH-500
    fixture's levels and subjects land in the rows; the device is resolved and recorded."""
    fixtures = Path(__file__).parent / "fixtures"
    out = tmp_path / "r.jsonl"
    args = ["eval", "--task", "math", "--methods", "self_consistency", "--budgets", "1", "--max-steps", "2",
            "--max-step-tokens", "16", "--no-progress", "--model", str(TOY_LM_PATH),
            "--system-prompt", ""]   # the toy LM's 128-token context has no room for a system prompt
    assert main([*args, "--dataset", str(fixtures / "gsm8k.jsonl"), "--out", str(out)]) == 0
    rows = rows_of(out)
    assert [(r["problem_id"], r["gold"]) for r in rows] == [("line-1", "7"), ("line-2", "7"), ("line-3", "1234")]
    assert all(isinstance(r["correct"], bool) and r["tokens"] > 0 and r["difficulty"] is None for r in rows)
    header = header_of(out)
    assert header["settings"]["device"] == "cpu" and header["info"]["dataset_file"] == "gsm8k.jsonl"
    out2 = tmp_path / "r2.jsonl"
    assert main([*args, "--dataset", str(fixtures / "math500.jsonl"), "--problems", "2", "--out", str(out2)]) == 0
    rows = rows_of(out2)
    assert [(r["problem_id"], r["gold"], r["difficulty"], r["subject"]) for r in rows] == [
        ("test/prealgebra/1.json", "7", 1, "Prealgebra"), ("test/algebra/7.json", "\\frac{1}{2}", 2, "Algebra")]
    capsys.readouterr()
    assert main([*args, "--dataset", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r3.jsonl")]) == 2
    assert "missing.jsonl" in error_of(capsys.readouterr().err) and not (tmp_path / "r3.jsonl").exists()


def test_sampling_controls_are_recorded_and_bad_ones_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--methods", "self_consistency", "--budgets", "2", "--problems", "1", "--top-p", "1.5",
                 "--out", str(out)]) == 2
    assert "top_p must be in (0, 1]" in error_of(capsys.readouterr().err) and not out.exists()
    assert main(["eval", "--methods", "self_consistency", "--budgets", "2", "--problems", "1", "--top-p", "0.9",
                 "--top-k", "5", "--min-p", "0.05", "--out", str(out)]) == 0
    settings = header_of(out)["settings"]
    assert (settings["top_p"], settings["top_k"], settings["min_p"]) == (0.9, 5, 0.05)


def test_results_header_records_what_produced_it(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(["eval", "--methods", "self_consistency", "--budgets", "1", "--problems", "1", "--out", str(out)]) == 0
    prov = header_of(out)["info"]["provenance"]
    import torch

    import ppl_scaling
    assert prov["ppl_scaling"] == ppl_scaling.__version__ and prov["packages"]["torch"] == torch.__version__
    assert prov["python"].count(".") == 2 and "transformers" in prov["packages"]
    assert prov["git_commit"] is None or len(prov["git_commit"].split("+")[0]) == 40
