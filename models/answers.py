"""Final answers: extraction from generated text, normalisation, and bounded math grading.

    extract_answer("... so \\boxed{\\frac{1}{2}}.")   -> "\\frac{1}{2}"
    extract_answer("24+5=29\\nA:29")                   -> "29"
    is_equivalent("\\frac{1}{2}", "0.5")               -> True
    grade("x+1", "1+x", timeout_s=5.0)                 -> Grade(correct=True, timed_out=False)

**Extraction** tries, in order: a custom regex (its first group, else the whole match),
the last ``\\boxed{...}`` (nested braces allowed), the last "A: ..." line (the toy
task's format), the last "The answer is ...". No answer gives None. It reads only the
last ``MAX_ANSWER_TEXT_CHARS`` (65,536) characters of the text: a final answer sits at
the end of a completion, and the cap bounds the work on any input, a custom regex
included. The built-in searches run in linear time (braces are matched in one pass;
the patterns cannot backtrack over long runs of whitespace), so a 1 MB adversarial
completion (``\\boxed{`` spam, newlines, nested braces) is read in milliseconds.

**Grading** (``grade``; ``is_equivalent`` is ``grade(...).correct``): a cheap fast path
first (equal normalised strings, or two plain numbers — integers, decimals, a/b
fractions, 1,000-style thousands — compared exactly as rationals), then the
``math-verify`` parser and verifier (sympy; never ``eval``). math-verify's own timeouts
use SIGALRM (main thread only) and cannot interrupt a long computation in C (``9^{9^{9^{9}}}``
never returns), so it runs in a separate worker process with a hard timeout, from any
thread: a small pool of persistent workers (at most ``GRADER_WORKERS``), each a fresh
``python -c`` interpreter that imports only math-verify (no fork of the caller, no
re-import of its ``__main__``). A verification that does not finish within
``timeout_s`` seconds kills its worker (a fresh one starts in the background) and grades
as incorrect with ``timed_out=True``; a worker that dies while verifying counts the same.
``timeout_s`` bounds the verification itself, not a worker's one-off start-up (about a
second, bounded by ``STARTUP_TIMEOUT_S``) nor the wait for a free worker. Each worker also
caps its own CPU time per request (RLIMIT_CPU, where available), so a verification cannot
outlive a caller that was killed. None (or an empty answer) is equivalent to nothing.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
from fractions import Fraction
from typing import Any, NamedTuple

__all__ = ["extract_boxed", "extract_answer", "normalize_answer", "is_equivalent", "grade", "Grade",
           "MAX_ANSWER_TEXT_CHARS", "shutdown_grader"]

MAX_ANSWER_TEXT_CHARS = 65_536  # extract_answer reads this many characters from the end of the text
GRADER_WORKERS = max(1, min(4, os.cpu_count() or 1))  # math-verify worker processes, at most
STARTUP_TIMEOUT_S = 60.0  # a worker must import math-verify within this (else RuntimeError)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_BRACE = re.compile(r"[{}]")
_WORD = re.compile(r"[^\s$]+")
# Linear-time: line starts are anchored, the whitespace before "A" cannot cross lines, and
# the runs of whitespace after "A:" / "answer is" are matched possessively (no backtracking).
_A_LINE = re.compile(r"^[^\S\n]*A[^\S\n]*:\s*+([^\n]*)", re.MULTILINE)
_ANSWER_IS = re.compile(r"answer is\s*+:?\s*+([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


# ----------------------------------------------------------------------------- extraction

def _closing_braces(text: str) -> dict[int, int]:
    """Position of each "{" -> position of the "}" that closes it (every brace counts,
    escaped or not; unmatched ones are absent). One pass over the braces."""
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    return close


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, with nested
    braces; ``\\boxed 5`` (no braces) gives "5". None if there is none or it is unclosed
    (then an earlier one is tried). Linear time in ``len(text)``."""
    close: dict[int, int] | None = None
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if close is None:
                close = _closing_braces(text)
            j = close.get(i)
            if j is not None:
                return text[i + 1:j].strip()
            continue  # unclosed: try an earlier one
        word = _WORD.match(text, i)
        if word:
            return word.group(0)
    return None


def extract_answer(text: str, pattern: str | re.Pattern[str] | None = None) -> str | None:
    """The final answer in ``text``, or None; see the module docstring for the order and
    the size cap (only the last ``MAX_ANSWER_TEXT_CHARS`` characters are read)."""
    if len(text) > MAX_ANSWER_TEXT_CHARS:
        text = text[-MAX_ANSWER_TEXT_CHARS:]
    if pattern is not None:
        m = _last_match(re.compile(pattern) if isinstance(pattern, str) else pattern, text)
        if m is None:
            return None
        return (m.group(1) if m.re.groups else m.group(0)).strip()
    for find in (extract_boxed, _last_group(_A_LINE), _last_group(_ANSWER_IS)):
        ans = find(text)
        if ans:
            return ans
    return None


def _last_match(regex: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in regex.finditer(text):
        pass
    return last


def _last_group(regex: re.Pattern[str]):
    def find(text: str) -> str | None:
        m = _last_match(regex, text)
        if m is None:
            return None
        ans = m.group(1).strip().rstrip(".").strip()
        return extract_boxed(ans) or ans.strip("$ ") or None
    return find


def normalize_answer(answer: str) -> str:
    """Canonical surface form: no surrounding $ / spaces / final period, no ``\\text{}``
    wrapper, ``\\dfrac`` -> ``\\frac``, no ``\\left`` / ``\\right``, no inner spaces."""
    s = answer.strip().rstrip(".").strip().strip("$").strip().rstrip(".")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "")
    return re.sub(r"\s+", "", s)


def _as_number(s: str) -> Fraction | None:
    """A plain number (integer, decimal, a/b, 1,000-style thousands) as an exact rational."""
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):  # also integers past sys.get_int_max_str_digits()
        return None


# ----------------------------------------------------------------------------- grading

class Grade(NamedTuple):
    """The outcome of ``grade``: ``correct``, and ``timed_out`` when math-verify did not
    finish within the time limit (then ``correct`` is False)."""

    correct: bool
    timed_out: bool = False


def grade(prediction: Any, reference: Any, *, timeout_s: float = 5.0) -> Grade:
    """Is the answer ``prediction`` (e.g. ``extract_answer``'s output, not the whole
    completion) mathematically equal to ``reference``? Cheap comparisons first, then
    math-verify in a worker process killed after ``timeout_s`` seconds (module docstring).
    Safe to call from any thread. None or an empty answer grades as incorrect."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
            math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if prediction is None or reference is None:
        return Grade(False)
    a, b = normalize_answer(str(prediction)), normalize_answer(str(reference))
    if not a or not b:
        return Grade(False)
    if a == b:
        return Grade(True)
    na, nb = _as_number(a), _as_number(b)
    if na is not None and nb is not None:
        return Grade(na == nb)
    return _pool().verify(a, b, float(timeout_s))


def is_equivalent(pred: str | None, gold: str | None, *, timeout_s: float = 5.0) -> bool:
    """True if the answers ``pred`` and ``gold`` are mathematically equal
    (``grade(pred, gold).correct``: a verification that times out counts as unequal)."""
    return grade(pred, gold, timeout_s=timeout_s).correct


def shutdown_grader() -> None:
    """Stop the idle math-verify workers (busy ones stop when their verification ends or
    times out). The next ``grade`` that needs one starts a fresh worker."""
    global _POOL
    with _POOL_LOCK:
        pool, _POOL = _POOL, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


# The worker: reads JSON lines [pred, gold, cpu_limit_s] on stdin, answers {"ok": bool} on the
# original stdout (anything printed goes to stderr); {"ready": true} once math-verify is imported.
_WORKER_SOURCE = r'''
import json, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
out = os.fdopen(os.dup(1), "w", encoding="ascii")
os.dup2(2, 1)
sys.stdout = sys.stderr
try:
    import resource
except ImportError:
    resource = None
def send(obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()
try:
    from math_verify import parse, verify
except BaseException as e:
    send({"error": f"math-verify is needed to grade non-trivial answers ({type(e).__name__}: {e}); "
                   "pip install math-verify (the llm extra)"})
    sys.exit(1)
send({"ready": True})
def wrap(s):
    return s if s.startswith("\\boxed") else "$" + s + "$"
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    pred, gold, limit = json.loads(line)
    if resource is not None:
        try:
            used = resource.getrusage(resource.RUSAGE_SELF)
            soft = int(used.ru_utime + used.ru_stime + limit) + 1
            hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
            if hard == resource.RLIM_INFINITY or soft < hard:
                resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        except (ValueError, OSError):
            pass
    try:
        g = parse(wrap(gold), parsing_timeout=None)
        p = parse(wrap(pred), parsing_timeout=None)
        ok = bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))
    except Exception:
        ok = False
    send({"ok": ok})
'''


class _WorkerDied(RuntimeError):
    pass


class _Worker:
    """One math-verify interpreter, its pipes and a thread that reads its replies."""

    def __init__(self) -> None:
        if not sys.executable:
            raise RuntimeError("cannot start a math-verify worker: sys.executable is not set")
        self.proc = subprocess.Popen([sys.executable, "-P", "-c", _WORKER_SOURCE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        self.replies: queue.Queue[bytes | None] = queue.Queue()
        self.ready = False
        threading.Thread(target=self._read, args=(self.proc.stdout, self.replies),
                         name="math-verify-reader", daemon=True).start()

    @staticmethod
    def _read(stream: Any, replies: queue.Queue) -> None:
        try:
            for line in iter(stream.readline, b""):
                replies.put(line)
        except (OSError, ValueError):
            pass
        replies.put(None)

    def _reply(self, timeout: float) -> dict | None:
        """The next message, None on timeout; raises _WorkerDied at end of output."""
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            raise _WorkerDied("the math-verify worker exited")
        return json.loads(line)

    def wait_ready(self) -> None:
        """Wait for math-verify to be imported; raises _WorkerDied, RuntimeError or ImportError."""
        if self.ready:
            return
        msg = self._reply(STARTUP_TIMEOUT_S)
        if msg is None:
            raise RuntimeError(f"the math-verify worker did not start within {STARTUP_TIMEOUT_S:.0f} s")
        if "error" in msg:
            raise ImportError(msg["error"])
        self.ready = True

    def send(self, a: str, b: str, timeout_s: float) -> None:
        try:
            self.proc.stdin.write((json.dumps([a, b, timeout_s]) + "\n").encode("ascii"))
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise _WorkerDied(str(e)) from e

    def result(self, timeout_s: float) -> Grade:
        """The verdict, or timed_out when none came within ``timeout_s``; raises _WorkerDied."""
        msg = self._reply(timeout_s)
        if msg is None:
            return Grade(False, timed_out=True)
        return Grade(bool(msg.get("ok")))

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Pool:
    """At most ``size`` workers; a worker that timed out or died is killed and replaced."""

    def __init__(self, size: int) -> None:
        self.size, self.pid = size, os.getpid()
        self.idle: list[_Worker] = []
        self.live: set[_Worker] = set()
        self.cond = threading.Condition()
        self.closed = False

    def _acquire(self) -> _Worker:
        with self.cond:
            while not self.idle and len(self.live) >= self.size:
                self.cond.wait()
            while self.idle:
                w = self.idle.pop()
                if w.proc.poll() is None:
                    return w
                self.live.discard(w)  # exited while idle (killed from outside)
                w.kill()
            w = _Worker()
            self.live.add(w)
            return w

    def _release(self, w: _Worker, healthy: bool) -> None:
        if not healthy:
            w.kill()
        with self.cond:
            if healthy and not self.closed:
                self.idle.append(w)
            else:
                self.live.discard(w)
                if healthy:
                    w.kill()
                elif not self.closed and not self.idle:
                    try:  # a replacement starts importing now, so the next call need not wait for it
                        r = _Worker()
                        self.live.add(r)
                        self.idle.append(r)
                    except OSError:
                        pass
            self.cond.notify()

    def verify(self, a: str, b: str, timeout_s: float) -> Grade:
        for attempt in range(2):
            w = self._acquire()
            healthy = False
            try:
                try:
                    w.wait_ready()
                    w.send(a, b, timeout_s)
                except _WorkerDied as e:  # died before it had the request: try a fresh worker once
                    if attempt:
                        raise RuntimeError(f"math-verify workers keep exiting at start-up ({e})") from e
                    continue
                try:
                    g = w.result(timeout_s)
                except _WorkerDied:
                    g = Grade(False, timed_out=True)  # died while verifying (e.g. out of memory)
                healthy = not g.timed_out
                return g
            finally:
                self._release(w, healthy)
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self.cond:
            self.closed = True
            idle, self.idle = self.idle, []
            for w in idle:
                self.live.discard(w)
            self.cond.notify_all()
        for w in idle:
            w.kill()

    def kill_all(self) -> None:
        for w in list(self.live):
            w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _Pool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():  # a forked child gets its own workers
            _POOL = _Pool(GRADER_WORKERS)
        return _POOL


@atexit.register
def _kill_workers() -> None:
    pool = _POOL
    if pool is not None and pool.pid == os.getpid():
        pool.kill_all()
