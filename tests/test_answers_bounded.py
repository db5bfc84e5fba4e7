"""Bounded grading: linear-time answer extraction with a size cap, and math-verify run in
worker processes with a hard timeout, safe from any thread (models/answers.py)."""
from __future__ import annotations

import threading
import time

import pytest

from ppl_scaling.models import answers
from ppl_scaling.models.answers import (MAX_ANSWER_TEXT_CHARS, Grade, extract_answer, extract_boxed, grade,
                                        is_equivalent)

pytest.importorskip("math_verify")

MB = 1_000_000

ADVERSARIAL = {
    "boxed spam": "\\boxed{" * (MB // 7),
    "boxed spam, then closed": "\\boxed{" * (MB // 8) + "}" * (MB // 8),
    "boxed without braces": "\\boxed " * (MB // 7),
    "newlines": "\n" * MB,
    "newlines and spaces": "\n " * (MB // 2),
    "nested braces": "\\boxed{" + "{" * (MB // 2) + "}" * (MB // 2 - 1),
    "A: spam": "A:" * (MB // 2),
    "A: lines": "A:\n" * (MB // 3),
    "A then whitespace": "A" + " " * MB,
    "answer is, then whitespace": "The answer is" + " \n" * (MB // 2),
    "answer is spam": "answer is " * (MB // 10),
    "fbox and braces": "\\fbox{{}" * (MB // 8),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_completions_extract_fast(name):
    text = ADVERSARIAL[name]
    assert len(text) >= MB - 20
    t0 = time.perf_counter()
    extract_answer(text)
    extract_boxed(text[-MAX_ANSWER_TEXT_CHARS:])
    assert time.perf_counter() - t0 < 1.0, name


def test_extract_boxed_is_linear_on_the_whole_text():
    t0 = time.perf_counter()
    assert extract_boxed("\\boxed{" * (MB // 7)) is None  # no cap inside extract_boxed
    assert extract_boxed("\\boxed{" * (MB // 14) + "}" * (MB // 14)) == ""  # the innermost, last box
    assert time.perf_counter() - t0 < 2.0


def test_answer_at_the_end_of_a_long_completion_is_found():
    assert extract_answer("x" * MB + " so \\boxed{42}.") == "42"
    assert extract_answer("\n" * MB + "A: 7\n") == "7"
    assert extract_answer(" " * MB + "The answer is 12.") == "12"
    # only the last MAX_ANSWER_TEXT_CHARS characters are read
    assert extract_answer("\\boxed{1}" + "x" * MAX_ANSWER_TEXT_CHARS) is None
    assert extract_answer("\\boxed{1}" + "x" * (MAX_ANSWER_TEXT_CHARS - 9)) == "1"


@pytest.mark.parametrize("text, answer", [
    ("\\boxed{a{b}c} and \\boxed{d", "a{b}c"),            # the last box is unclosed: the earlier one
    ("}} \\boxed{x} }", "x"),                              # stray closing braces
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{{}}", "{}"),
    ("\\boxed{ 3 }\\boxed", "3"),                          # a bare \\boxed at the very end
    ("\\boxed{1} \\boxed $", "1"),
    ("A:\n29", "29"),                                      # as before: the answer may follow on the next line
    ("\n\n  A: 5\nA: 6", "6"),
    ("  A : 4", "4"),
    ("The answer is:\n 42", "42"),
    ("The answer is 5. Thus the answer is \\boxed{6}", "6"),
])
def test_extraction_semantics(text, answer):
    assert extract_answer(text) == answer


def test_custom_pattern_reads_the_capped_tail():
    text = "Final: 1\n" + "-" * MB + "Final: 2"
    t0 = time.perf_counter()
    assert extract_answer(text, r"Final:\s*(\d+)") == "2"
    assert time.perf_counter() - t0 < 1.0


def test_ordinary_answers_grade_correctly():
    assert grade("\\frac{1}{2}", "0.5") == Grade(True, False)
    assert grade("3", "4") == Grade(False, False)
    assert grade("1,000", "1000").correct
    assert grade(None, "3") == Grade(False, False)
    assert grade(12, 12.0).correct                        # non-strings are read as text
    assert grade("x+1", "1+x") == Grade(True, False)      # math-verify, in a worker
    assert grade("\\sqrt{2}/2", "\\frac{\\sqrt 2}{2}").correct
    assert not grade("x+2", "1+x").correct
    assert is_equivalent("\\dfrac12", "\\frac{1}{2}") and not is_equivalent("0.333", "1/3")


def test_timeout_must_be_positive():
    for bad in (0, -1.0, float("nan"), float("inf"), None, True):
        with pytest.raises(ValueError, match="timeout_s"):
            grade("x", "y", timeout_s=bad)


def test_huge_power_times_out_from_a_worker_thread():
    assert grade("x+1", "1+x").correct  # warm a worker: start-up is not part of timeout_s
    timeout = 2.0
    out: dict = {}

    def work():
        t0 = time.perf_counter()
        out["grade"] = grade("9^{9^{9^{9}}}", "1", timeout_s=timeout)
        out["seconds"] = time.perf_counter() - t0

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout + 10)
    assert not th.is_alive(), "grading hung"
    assert out["grade"] == Grade(correct=False, timed_out=True)
    assert out["seconds"] < timeout + 2.0
    # the process is alive and grading still works (the killed worker was replaced)
    assert grade("2x", "x*2", timeout_s=30).correct
    assert is_equivalent("(1,2)", "\\left(1, 2\\right)")


def test_concurrent_grading_with_a_timeout_among_them():
    cases = [("x+1", "1+x", True), ("\\frac{2}{4}", "1/2", True), ("x^2", "x*x", True),
             ("2y", "y+y", True), ("y", "2y", False), ("9^{9^{9^{9}}}", "1", None)]
    results: dict[int, Grade] = {}

    def work(k):
        a, b, _ = cases[k]
        results[k] = grade(a, b, timeout_s=3.0 if cases[k][2] is None else 30.0)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(len(cases))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads)
    for k, (_, _, expected) in enumerate(cases):
        if expected is None:
            assert results[k] == Grade(False, True)
        else:
            assert results[k] == Grade(expected, False), cases[k]


def test_a_worker_killed_from_outside_is_replaced():
    assert grade("x+1", "1+x").correct
    pool = answers._pool()
    for w in list(pool.idle):
        w.proc.kill()
        w.proc.wait()
    assert grade("x+3", "3+x") == Grade(True, False)


def test_shutdown_grader_then_grade_again():
    assert grade("x+1", "1+x").correct
    answers.shutdown_grader()
    assert answers._POOL is None
    assert grade("a+b", "b+a").correct
