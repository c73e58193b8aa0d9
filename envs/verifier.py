"""Answer extraction and numeric equivalence for math tasks.

The verifier never evaluates model text as code: a candidate answer is reduced to a short string of
digits, operators and parentheses (LaTeX ``\\frac`` and ``\\dfrac`` are rewritten first), checked
against a character whitelist and size limits, and only then parsed by sympy with evaluation off so
that a hostile ``9**9**9**9`` is refused before it is computed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from fractions import Fraction

import sympy

__all__ = ["Verdict", "answers_equal", "equation_is_false", "extract_answer", "parse_number", "verify"]

_ANSWER_MARK = "####"
_ALLOWED = re.compile(r"^[0-9+\-*/().^ eE]+$")
_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")
_MAX_CHARS = 64
_INT_EQUATION = re.compile(r"^\s*(-?\d{1,9})\s*([-+*])\s*(-?\d{1,9})\s*=\s*(-?\d{1,12})\s*$")
_MAX_EXPONENT = 64
_MAX_BASE = 10**6


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one completed solution."""

    correct: bool
    """True when the extracted answer equals the gold answer."""
    answer: str | None
    """The answer text found in the solution (None when there was none)."""
    reason: str
    """A short human-readable explanation ("equal", "different value", "no answer", ...)."""


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text``, with balanced braces."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: what follows the last ``####``, else the last
    ``\\boxed{...}``; None when the solution states no answer."""
    if not isinstance(text, str):
        return None
    idx = text.rfind(_ANSWER_MARK)
    if idx >= 0:
        tail = text[idx + len(_ANSWER_MARK) :].strip()
        line = tail.splitlines()[0].strip() if tail else ""
        return line or None
    return _last_boxed(text)


def _clean(answer: str) -> str:
    s = answer.strip()
    s = _FRAC.sub(r"(\1)/(\2)", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("{", "(").replace("}", ")").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("$", "").replace(",", "").replace("\u2212", "-")
    s = s.rstrip(".").strip()
    # A unit or word after a number ("18 dollars") is dropped; words before it are not guessed at.
    m = re.match(r"^([0-9+\-*/().^ eE]+?)\s*[a-zA-Z%]+$", s)
    if m and not re.search(r"[eE]", s):
        s = m.group(1).strip()
    return s


def _safe_tree(expr: sympy.Expr) -> bool:
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow):
            base, exp = node.args
            if not (exp.is_Number and abs(exp) <= _MAX_EXPONENT):
                return False
            if base.is_Number and abs(base) > _MAX_BASE:
                return False
        elif not isinstance(node, (sympy.Number, sympy.Add, sympy.Mul, sympy.Pow)):
            return False
    return True


def parse_number(answer: str) -> sympy.Rational | sympy.Float | None:
    """An exact number for a short answer string, or None when it is not one.

    Accepts integers with thousands separators, decimals, signs, fractions (``3/4``,
    ``\\frac{3}{4}``) and small arithmetic expressions (``2*(3+4)``); refuses anything else.
    Results are cached (sympy numbers are immutable): search verifies the same lines many times.
    """
    if not isinstance(answer, str):
        return None
    return _parse_number(answer)


@functools.lru_cache(maxsize=1 << 16)
def _parse_number(answer: str) -> sympy.Rational | sympy.Float | None:
    s = _clean(answer)
    if not s or len(s) > _MAX_CHARS or not _ALLOWED.match(s):
        return None
    plain = s.replace(" ", "")
    if re.fullmatch(r"[+-]?\d+(\.\d+)?", plain):  # the common case, no sympy
        return sympy.Rational(Fraction(plain))
    if re.fullmatch(r"[+-]?\d+/\d+", plain):
        num, den = plain.split("/")
        return None if int(den) == 0 else sympy.Rational(int(num), int(den))
    try:
        expr = sympy.parse_expr(s.replace("^", "**"), evaluate=False)
    except Exception:  # sympy raises many types on malformed input  # noqa: BLE001
        return None
    if not isinstance(expr, sympy.Expr) or not _safe_tree(expr):
        return None
    try:
        value = sympy.nsimplify(expr.doit(), rational=True)
    except Exception:  # noqa: BLE001
        return None
    if value.is_Number and value.is_finite:
        return value
    return None


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """True when two answer strings denote the same number (``0.5`` == ``1/2`` == ``\\frac12``,
    ``1,000`` == ``1000``); strings that are not numbers are compared after whitespace removal."""
    if pred is None or gold is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        if a.is_Rational and b.is_Rational:  # exact, and far cheaper than simplify
            return bool(a == b)
        return bool(sympy.simplify(a - b) == 0)
    if a is None and b is None:
        return re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", gold) and pred.strip() != ""
    return False


def verify(solution: str, gold: str) -> Verdict:
    """Judge a completed solution text against the gold answer."""
    answer = extract_answer(solution)
    if answer is None:
        return Verdict(False, None, "no answer")
    if parse_number(answer) is None and parse_number(gold) is not None:
        return Verdict(False, answer, "answer is not a number")
    if answers_equal(answer, gold):
        return Verdict(True, answer, "equal")
    return Verdict(False, answer, "different value")


def equation_is_false(line: str) -> bool:
    """True when ``line`` is an arithmetic equation (``lhs = rhs``, both sides numbers or small
    expressions) whose sides differ; False for true equations and for anything else (prose,
    answers, partial lines), which is not judged."""
    m = _INT_EQUATION.match(line)
    if m:  # the common case, without sympy
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        return (a + b if op == "+" else a - b if op == "-" else a * b) != c
    if line.count("=") != 1 or "####" in line:
        return False
    lhs, rhs = line.split("=")
    if not (_ALLOWED.match(lhs.strip() or "x") and _ALLOWED.match(rhs.strip() or "x")):
        return False
    a, b = parse_number(lhs), parse_number(rhs)
    return a is not None and b is not None and not answers_equal(lhs, rhs)
