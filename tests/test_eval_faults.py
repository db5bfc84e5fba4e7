"""Fault injection for `ppl-scaling eval / report`: kills, torn lines, concurrent writers,
foreign and corrupt files, changed settings and datasets, failing problems, malformed rows.
Each fault must give a clear one-line error (and an untouched file) or the same results as
a run without the fault, in bounded time, on the bundled toy models."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppl_scaling.cli import main
from ppl_scaling.errors import DegenerateWeightsError
from ppl_scaling.jsonl import NotAResultsFile, ResultsFile, ResultsFileBusy
from ppl_scaling.models import evaluate as ev
from ppl_scaling.models import toy
from ppl_scaling.models.report import accuracy_table, read_results, report
from llm_fixtures import TOY_LM_PATH, prm_path, random_prm, toy_lm

MODELS = ["--model", str(TOY_LM_PATH), "--prm", str(prm_path())]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rows_of(path: Path) -> list[dict]:
    header, *rows = records(path)
    assert "ppl_scaling_results" in header
    return rows


def error_of(err: str) -> str:
    """The single error line of a failed command (model loaders may print progress bars before it)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("ppl-scaling: error: ")]
    assert len(lines) == 1, err
    assert err.rstrip("\n").endswith(lines[0]) and "Traceback" not in err
    return lines[0]


def snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


def strip(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k != "wall_s"} for r in rows), key=str)


def eval_args(out: Path, *extra: str, problems: int = 2, methods: str = "self_consistency,best_of_n",
              budgets: str = "2") -> list[str]:
    return ["eval", "--problems", str(problems), "--methods", methods, "--budgets", budgets, "--out", str(out),
            "--no-progress", *extra, *MODELS]


def reference(tmp_path: Path, problems: int, methods: list[str], budgets: list[int], **kw) -> list[dict]:
    out = tmp_path / f"reference-{len(list(tmp_path.iterdir()))}.jsonl"
    return ev.evaluate(ev.arithmetic_task(problems, kw.pop("dataset", None)), toy_lm(), random_prm(), methods,
                       budgets, out, seed=0, model_name=TOY_LM_PATH, prm_name=prm_path(), progress=False, **kw)


# --- kills and torn lines ------------------------------------------------------------------

def test_sigkill_mid_run_then_a_torn_line_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    args = eval_args(out, problems=3, budgets="1,2")   # 12 runs
    proc = subprocess.Popen([sys.executable, "-m", "ppl_scaling.cli", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            (not out.exists() or len(out.read_text().splitlines()) < 3):   # the header and 2 rows
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = rows_of(out)
    assert 2 <= len(partial) < 12, "the kill should land mid-run"
    with out.open("a") as fh:                  # a write cut off by the kill
        fh.write('{"problem_id": "test-0002", "method": "best_of_n", "bud')
    inode = out.stat().st_ino

    assert main(args) == 0                     # the kill left no stale lock; the torn record is dropped
    assert "removed an incomplete last record" in capsys.readouterr().err
    assert out.stat().st_ino != inode          # repaired by an atomic replace ...
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]   # ... that left no temp file
    rows = rows_of(out)
    assert rows[: len(partial)] == partial     # appended, never rewritten
    keys = [(r["problem_id"], r["method"], r["budget"]) for r in rows]
    assert len(keys) == len(set(keys)) == 12
    ref = reference(tmp_path, 3, ["self_consistency", "best_of_n"], [1, 2])
    assert strip(rows) == strip(ref)


def test_only_an_incomplete_last_record_is_ever_removed(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, ev.KEY, settings={"seed": 0}) as f:
        f.write({"problem_id": "a", "method": "m", "budget": 1, "correct": True})
    good = out.read_bytes()
    for tail in [b"a note without a newline", b"not json\n", b"12\n", b'{"problem_id": "b"}\n']:
        out.write_bytes(good + tail)           # not an interrupted record: refused, untouched
        before = snapshot(out)
        with pytest.raises(ValueError, match="nothing was changed|not a ppl-scaling results file"):
            ResultsFile(out, ev.KEY, settings={"seed": 0})
        assert snapshot(out) == before
    out.write_bytes(good.rstrip(b"\n"))        # a complete last record without its newline: kept
    with ResultsFile(out, ev.KEY, settings={"seed": 0}) as f:
        assert len(f.rows) == 1 and "newline" in f.repaired
    assert out.read_bytes() == good


# --- files that are not ours, concurrent writers ----------------------------------------------

FOREIGN = {
    "notes": b"my notes, one line\n",
    "no_newline": b"my notes",
    "json_object": b'{"a": 1}\n',
    "json_list": b"[1, 2]\n",
    "blank": b"\n\n",
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00",
    "dataset": b'{"id": "x", "problem": "Q:1+2\\n", "answer": "3"}\n',
    "legacy_results": b'{"problem_id": "test-0000", "method": "best_of_n", "budget": 1, "correct": true}\n',
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_a_foreign_out_file_is_refused_and_left_untouched(tmp_path, capsys, name):
    out = tmp_path / "notes.txt"
    out.write_bytes(FOREIGN[name])
    before = snapshot(out)
    t0 = time.time()
    assert main(eval_args(out)) == 2
    err = error_of(capsys.readouterr().err)
    assert ("older version" if name == "legacy_results" else "not a ppl-scaling results file") in err
    assert "nothing was changed" in err
    assert snapshot(out) == before
    assert time.time() - t0 < 10              # refused before the models load
    with pytest.raises(NotAResultsFile):      # the library refuses it too
        ev.evaluate(ev.arithmetic_task(1), toy_lm(), None, ["self_consistency"], [1], out, progress=False)
    assert snapshot(out) == before


def test_a_second_concurrent_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(eval_args(out, problems=1, methods="self_consistency", budgets="1")) == 0
    before = snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(eval_args(out, problems=2, methods="self_consistency", budgets="1")) == 2
        assert "being written by another process" in error_of(capsys.readouterr().err)
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with ResultsFile(out, ev.KEY) as first:   # in one process: the second opener is refused too ...
        with pytest.raises(ResultsFileBusy, match="another process"):
            ResultsFile(out, ev.KEY)
        first.replace({**first.rows[0], "correct": True})   # ... also after an atomic replace of the file
        with pytest.raises(ResultsFileBusy):
            ResultsFile(out, ev.KEY)
    with ResultsFile(out, ev.KEY):            # released on close
        pass


# --- settings, datasets and models -----------------------------------------------------------

def test_a_settings_change_is_refused_naming_each_difference_and_the_file_is_untouched(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(eval_args(out, problems=1, methods="best_of_n", budgets="1")) == 0
    with out.open("a") as fh:
        fh.write('{"problem_id": "test-0001", "meth')   # even a repair waits for the settings check
    before = snapshot(out)
    assert main(eval_args(out, "--temperature", "0.5", "--prm-aggregation", "min", "--seed", "3",
                          problems=1, methods="best_of_n", budgets="1")) == 2
    err = error_of(capsys.readouterr().err)
    for diff in ["temperature: 1.0 in the file, 0.5 now", "prm_aggregation: 'last' in the file, 'min' now",
                 "seed: 0 in the file, 3 now"]:
        assert diff in err
    assert "another --out" in err and "max_steps" not in err
    assert snapshot(out) == before
    assert main(eval_args(out, "--max-step-tokens", "10", problems=1, methods="best_of_n", budgets="1")) == 2
    assert "max_step_tokens: 12 in the file, 10 now" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_changed_dataset_with_the_same_ids_is_refused(tmp_path, capsys):
    problems = toy.load_split("test")
    a = toy.write_jsonl(problems[:3], tmp_path / "a.jsonl")
    b = toy.write_jsonl([toy.Problem(p.id, q.question, q.answer) for p, q in zip(problems[:3], problems[10:13])],
                        tmp_path / "b.jsonl")
    out = tmp_path / "r.jsonl"
    args = ["--methods", "self_consistency", "--budgets", "1", "--out", str(out), "--no-progress", *MODELS]
    assert main(["eval", "--dataset", str(a), "--problems", "2", *args]) == 0
    before = snapshot(out)
    assert main(["eval", "--dataset", str(b), *args]) == 2
    err = error_of(capsys.readouterr().err)
    assert "dataset: 'sha256:" in err and "in the file" in err
    assert snapshot(out) == before
    same = tmp_path / "same_content.jsonl"
    shutil.copy(a, same)                       # the same content under another name: resumes and extends
    assert main(["eval", "--dataset", str(same), *args]) == 0
    assert [r["problem_id"] for r in rows_of(out)] == [p.id for p in problems[:3]]


def test_the_model_identity_is_its_content_not_its_path(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    copy = shutil.copytree(TOY_LM_PATH, tmp_path / "elsewhere" / "toy_lm")
    args = ["eval", "--problems", "1", "--methods", "self_consistency", "--budgets", "1", "--out", str(out),
            "--no-progress", "--prm", str(prm_path())]
    assert main([*args, "--model", str(TOY_LM_PATH)]) == 0
    header = records(out)[0]
    assert header["settings"]["model"].startswith("toy_lm@") and str(TOY_LM_PATH) not in out.read_text()
    before = snapshot(out)
    assert main([*args, "--model", str(copy)]) == 0      # a copy of the same files: the same model
    assert snapshot(out) == before
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config, indent=1))   # other files: another model
    assert main([*args, "--model", str(copy)]) == 2
    assert "model: 'toy_lm@" in error_of(capsys.readouterr().err)
    assert snapshot(out) == before


def test_model_fingerprints_read_hub_blob_names_and_the_edges_of_large_files(tmp_path, monkeypatch):
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(blob)         # a hub cache link: its blob name is its sha256
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("about the model")     # not part of the model
    first = ev.files_fingerprint(folder)
    (folder / "README.md").write_text("edited")
    assert ev.files_fingerprint(folder) == first
    (folder / "config.json").write_text('{"a": 1}')
    assert ev.files_fingerprint(folder) != first
    monkeypatch.setattr(ev, "_FULL_HASH_BYTES", 16)
    monkeypatch.setattr(ev, "_EDGE_BYTES", 4)
    big = folder / "big.bin"
    big.write_bytes(b"head" + b"x" * 100 + b"tail")
    before = ev.files_fingerprint(folder)
    big.write_bytes(b"HEAD" + b"x" * 100 + b"tail")             # the edges of a large file count
    assert ev.files_fingerprint(folder) != before


def test_bad_datasets_and_arguments_are_refused_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "problem": "Q:1+2", "answer": "3"}\n{"id": "b", "problem": "Q:2+2", "answer": "4"}\n'
                   '{"id": "a", "problem": "Q:3+2", "answer": "5"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "Q:1+2", "answer": "3"}\n{"problem": "Q:1+' + "9" * 5000 + "\n")
    cases = [
        (["--dataset", str(dup)], "dup.jsonl: duplicate problem ids: 'a' on lines 1 and 3"),
        (["--task", "math", "--dataset", str(dup)], "dup.jsonl: duplicate problem ids: 'a' on lines 1 and 3"),
        (["--dataset", str(bad)], "bad.jsonl:2: not valid JSON"),
        (["--problems", "-1"], "argument --problems: expected a positive integer, got '-1'"),
        (["--problems", "0"], "argument --problems: expected a positive integer"),
        (["--budgets", "0,2"], "argument --budgets: expected comma-separated positive integers, got '0,2'"),
        (["--temperature", "nan"], "argument --temperature"),
        (["--methods", "no_such_method"], "'no_such_method' is an unknown method"),
    ]
    for extra, message in cases:
        assert main(["eval", "--out", str(out), "--no-progress", *extra, *MODELS]) == 2, extra
        line = error_of(capsys.readouterr().err)
        assert message in line, (extra, line)
        assert len(line) < 700                # a 5000-character bad line is quoted in part only
        assert not out.exists()
    with pytest.raises(ValueError, match="duplicate problem ids: 'x' at items 0 and 1"):
        item = ev.Item("x", "Q:1+2\n", "3")
        task = ev.Task("arithmetic", (item, item), ev.ARITHMETIC_CONFIG, ev.arithmetic_correct)
        ev.evaluate(task, toy_lm(), None, ["self_consistency"], [1], out, progress=False)
    with pytest.raises(ValueError, match="positive integer"):
        ev.arithmetic_task(-1)
    assert not out.exists()


def test_duplicate_methods_and_budgets_count_once(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(eval_args(out, problems=2, methods="self_consistency,self_consistency", budgets="1,1")) == 0
    assert len(rows_of(out)) == 2
    rows = ev.evaluate(ev.arithmetic_task(2), toy_lm(), random_prm(), ["self_consistency"] * 2, [1, 1], out, seed=0,
                       model_name=TOY_LM_PATH, prm_name=prm_path(), progress=False)
    assert len(rows) == 2


# --- failure isolation ---------------------------------------------------------------------

def failing_on(problem_id: str, error: BaseException):
    """``run_method`` that raises ``error`` on the prompt of ``problem_id``."""
    real = ev.run_method
    prompt = next(p.prompt for p in toy.load_split("test") if p.id == problem_id)

    def run_method(method, lm, text, **kw):
        if text == prompt:
            raise error
        return real(method, lm, text, **kw)
    return run_method


def test_a_failing_problem_gives_error_rows_the_rest_completes_and_retry_errors_fixes_it(tmp_path, capsys,
                                                                                          monkeypatch):
    out = tmp_path / "r.jsonl"
    args = eval_args(out, problems=3, budgets="2")
    monkeypatch.setattr(ev, "run_method", failing_on("test-0001", DegenerateWeightsError("every particle has "
                                                                                         "weight zero")))
    assert main(args) == 1                    # finished, with failed runs
    err = capsys.readouterr().err
    assert err.count("run failed: problem test-0001") == 2 and "--retry-errors" in err
    rows = rows_of(out)
    assert len(rows) == 6
    failed = [r for r in rows if r.get("error")]
    assert {r["problem_id"] for r in failed} == {"test-0001"} and len(failed) == 2
    for r in failed:
        assert r["correct"] is None and r["error_type"] == "DegenerateWeightsError"
        assert "weight zero" in r["error"] and r["error_where"].startswith("test_eval_faults.py:")
    assert all(isinstance(r["correct"], bool) for r in rows if not r.get("error"))

    text = report(out)                        # errors counted apart, never as wrong or right
    assert "(1 err)" in text and "2 problems per cell" in text and "2 runs failed" in text
    assert all(c.errors == 1 and c.n == 2 for c in accuracy_table(read_results(out).rows).values())

    before = snapshot(out)
    assert main(args) == 1                    # a plain rerun does not run them again
    assert snapshot(out) == before
    monkeypatch.undo()
    assert main([*args, "--retry-errors"]) == 0
    fixed = rows_of(out)
    assert not [r for r in fixed if r.get("error")]
    assert [(r["problem_id"], r["method"]) for r in fixed] == [(r["problem_id"], r["method"]) for r in rows]
    assert [r for r in fixed if r["problem_id"] != "test-0001"] == [r for r in rows if r["problem_id"] != "test-0001"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert strip(fixed) == strip(reference(tmp_path, 3, ["self_consistency", "best_of_n"], [2]))


def test_keyboard_interrupt_still_stops_the_eval(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.jsonl"
    monkeypatch.setattr(ev, "run_method", failing_on("test-0001", KeyboardInterrupt()))
    assert main(eval_args(out, problems=3, methods="self_consistency")) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert [r["problem_id"] for r in rows_of(out)] == ["test-0000"]   # no error row for an interruption
    monkeypatch.undo()
    assert main(eval_args(out, problems=3, methods="self_consistency")) == 0
    assert [r["problem_id"] for r in rows_of(out)] == ["test-0000", "test-0001", "test-0002"]


# --- report and CLI errors ---------------------------------------------------------------------

def test_report_validates_rows_and_says_what_it_skipped(tmp_path, capsys):
    def row(pid, correct, method="best_of_n", **kw):
        return {"problem_id": pid, "method": method, "budget": 4, "correct": correct, "tokens": 10,
                "settings_id": "s1", **kw}
    header = {"ppl_scaling_results": 1, "settings_id": "s1", "settings": {"seed": 0, "temperature": 1.0}}
    lines = [header, row("p1", True), row("p2", False), {"a": 1}, [1, 2], row("p3", "false"),
             row("p4", None, error="server down", error_type="ConnectionError"), row("p1", False),
             row("p5", True, budget=0), row("p6", True, tokens="12")]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"problem_id": "p7", "met')
    assert main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    assert "skipped 7 of 11 lines" in text and "line 4: missing field 'problem_id'" in text
    assert "| best_of_n | 0.500 [0.09, 0.91] (1 err) |" in text   # p1 right, p2 wrong; "false" is not counted
    res = read_results(path)
    reasons = dict(res.skipped)
    assert "not a JSON object" in reasons[5] and "'correct' must be true or false, got \"false\"" in reasons[6]
    assert "second row" in reasons[8] and "'budget' must be a positive integer" in reasons[9]
    assert "'tokens' must be a non-negative number" in reasons[10] and "incomplete last line" in reasons[11]

    other = {**header, "settings_id": "s2", "settings": {"seed": 0, "temperature": 0.5}}
    two = tmp_path / "two.jsonl"              # two settings in one file: reported apart, never merged
    two.write_text("".join(json.dumps(x) + "\n" for x in [header, row("p1", True), other,
                                                           row("p1", False, settings_id="s2")]))
    text = report(two)
    assert "2 different settings" in text and "## [1] settings s1: temperature=1.0" in text
    assert "## [2] settings s2: temperature=0.5" in text and "1.000 [0.21, 1.00]" in text and "0.000 [0.00, 0.79]" in text
    with pytest.raises(ValueError, match="2 different settings"):
        accuracy_table(read_results(two).rows)
    with pytest.raises(ValueError, match="'correct' must be true or false"):
        accuracy_table([row("p1", "true")])

    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"a": 1}\n[1, 2]\n')
    assert main(["report", str(junk)]) == 2
    assert "holds no result rows; skipped 2 of 2 lines" in error_of(capsys.readouterr().err)


def test_every_cli_error_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import ppl_scaling.models.report as report_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line of the message")

    monkeypatch.setattr(report_module, "report", broken)
    assert main(["report", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == "ppl-scaling: error: RuntimeError: boom second line of the message\n"
    assert main(["report", str(tmp_path / "r.jsonl"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("ppl-scaling: error: RuntimeError: boom second line of the message\n")
    assert main(["eval", "--out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppl-scaling: error: argument --out: expected one argument") and err.count("\n") == 1
    assert main(["--help"]) == 0


def test_grading_timeouts_are_counted_per_row_and_reported(tmp_path):
    from ppl_scaling.models.answers import Grade

    def slow_grader(answer, gold):   # as answers.grade reports a verification that ran out of time
        return Grade(False, timed_out=answer is not None)

    task = ev.Task("arithmetic", ev.arithmetic_task(2).items, ev.ARITHMETIC_CONFIG, slow_grader)
    rows = ev.evaluate(task, toy_lm(), None, ["self_consistency"], [2], tmp_path / "r.jsonl", progress=False)
    assert all(r["correct"] is False and r["grading_timeouts"] == r["num_answers"] >= 1 for r in rows)
    text = report(tmp_path / "r.jsonl")
    assert f"{sum(r['grading_timeouts'] for r in rows)} candidate answers timed out in grading" in text
