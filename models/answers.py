"""Final answers: extraction from generated text, normalisation, and math equivalence.

    extract_answer("... so \\boxed{\\frac{1}{2}}.")   -> "\\frac{1}{2}"
    extract_answer("24+5=29\\nA:29")                   -> "29"
    is_equivalent("\\frac{1}{2}", "0.5")               -> True

Extraction tries, in order: a custom regex (its first group, else the whole match),
the last ``\\boxed{...}`` (nested braces allowed), the last "A: ..." line (the toy
task's format), the last "The answer is ...". No answer gives None.

Equivalence: a cheap fast path first (equal normalised strings, or two plain numbers
— integers, decimals, a/b fractions — compared exactly as rationals), then the
``math-verify`` parser and verifier (sympy; never ``eval``). None is equivalent to
nothing.
"""
from __future__ import annotations

import re
import threading
from fractions import Fraction

__all__ = ["extract_boxed", "extract_answer", "normalize_answer", "is_equivalent"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_A_LINE = re.compile(r"(?:^|\n)\s*A\s*:\s*([^\n]*)")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, with nested
    braces; ``\\boxed 5`` (no braces) gives "5". None if there is none or it is unclosed."""
    for m in reversed(list(_BOXED.finditer(text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
            continue  # unclosed: try an earlier one
        word = re.match(r"[^\s$]+", text[i:])
        if word:
            return word.group(0)
    return None


def extract_answer(text: str, pattern: str | re.Pattern[str] | None = None) -> str | None:
    """The final answer in ``text``, or None; see the module docstring for the order."""
    if pattern is not None:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        m = matches[-1]
        return (m.group(1) if m.re.groups else m.group(0)).strip()
    for find in (extract_boxed, _last_group(_A_LINE), _last_group(_ANSWER_IS)):
        ans = find(text)
        if ans:
            return ans
    return None


def _last_group(regex: re.Pattern[str]):
    def find(text: str) -> str | None:
        matches = list(regex.finditer(text))
        if not matches:
            return None
        ans = matches[-1].group(1).strip().rstrip(".").strip()
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
    except (ValueError, ZeroDivisionError):
        return None


def is_equivalent(pred: str | None, gold: str | None) -> bool:
    """True if the answers ``pred`` and ``gold`` are mathematically equal."""
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    na, nb = _as_number(a), _as_number(b)
    if na is not None and nb is not None:
        return na == nb
    return _math_verify(a, b)


def _math_verify(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use SIGALRM, which exists only in the main thread
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    wrap = lambda s: s if s.startswith("\\boxed") else f"${s}$"  # noqa: E731
    parsed_gold = parse(wrap(gold), parsing_timeout=timeout)
    parsed_pred = parse(wrap(pred), parsing_timeout=timeout)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=timeout))
