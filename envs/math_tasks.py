"""Math task sources: the procedural arithmetic generator and GSM8K / MATH JSONL files.

A task is a plain dict with ``task_id``, ``prompt`` (the text the policy continues), ``answer``
(gold answer string), ``level`` (difficulty, 0 when unknown) and, where known, ``solution`` (a
reference solution, one step per line, ending in ``#### answer``).

Arithmetic tasks chain 2–5 operations left to right on values kept within 0–999 (``+``/``-`` with
operands ≤ 99, ``*`` by 2–9). The question is the fully parenthesised expression and the reference
solution does one operation per line::

    ((45+23)*3)-17
    45+23=68
    68*3=204
    204-17=187
    #### 187
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from envs.verifier import extract_answer, parse_number

__all__ = [
    "ARITHMETIC_LEVELS",
    "TaskFileError",
    "arithmetic_task",
    "arithmetic_tasks",
    "heldout_arithmetic_tasks",
    "load_gsm8k_jsonl",
    "load_math_jsonl",
    "load_tasks",
]

ARITHMETIC_LEVELS = (2, 3, 4, 5)
"""Difficulty levels of the generator: the number of operations in a problem."""

HELDOUT_SEED = 2_000_003
"""Seed of the fixed held-out set; training streams skip every held-out question."""


class TaskFileError(ValueError):
    """A task file is missing or malformed; the message names the file, the line and the fix."""


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_task(rng: np.random.Generator, level: int) -> dict:
    """One arithmetic problem with ``level`` operations, drawn from ``rng``."""
    if level < 1:
        raise ValueError(f"level must be >= 1, got {level}")
    value = int(rng.integers(1, 100))
    expr = str(value)
    lines = []
    for _ in range(level):
        ops = []
        if value <= 999 - 1:
            ops.append("+")
        if value >= 1:
            ops.append("-")
        if 1 <= value <= 999 // 2:
            ops.append("*")
        op = ops[int(rng.integers(len(ops)))]
        if op == "+":
            operand = int(rng.integers(1, min(99, 999 - value) + 1))
        elif op == "-":
            operand = int(rng.integers(1, min(99, value) + 1))
        else:
            operand = int(rng.integers(2, min(9, 999 // value) + 1))
        new = _apply(op, value, operand)
        lines.append(f"{value}{op}{operand}={new}")
        expr = f"({expr}){op}{operand}" if lines[:-1] else f"{expr}{op}{operand}"
        value = new
    solution = "\n".join(lines) + f"\n#### {value}\n"
    return {
        "task_id": f"arith-L{level}-{expr}",
        "prompt": expr + "\n",
        "answer": str(value),
        "level": level,
        "solution": solution,
    }


def arithmetic_tasks(
    seed: int,
    levels: Iterable[int] = ARITHMETIC_LEVELS,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> Iterator[dict]:
    """An endless stream of distinct arithmetic tasks cycling through ``levels``; prompts in
    ``exclude`` (for example the held-out set's) are skipped."""
    rng = np.random.default_rng(seed)
    levels = tuple(levels)
    seen: set[str] = set()
    i = 0
    while True:
        task = arithmetic_task(rng, levels[i % len(levels)])
        if task["prompt"] in exclude or task["prompt"] in seen:
            continue
        seen.add(task["prompt"])
        i += 1
        yield task


def heldout_arithmetic_tasks(n: int, levels: Iterable[int] = ARITHMETIC_LEVELS) -> list[dict]:
    """The fixed held-out set: ``n`` distinct problems, levels in equal shares, independent of the
    run's seed so that every run is scored on the same problems."""
    stream = arithmetic_tasks(HELDOUT_SEED, levels)
    return [next(stream) for _ in range(n)]


def _read_jsonl(path: str | os.PathLike, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    if not os.path.isfile(path):
        raise TaskFileError(f"task file {str(path)!r} does not exist: give the path of a .jsonl file")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFileError(
                    f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise TaskFileError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if not isinstance(row.get(k), str)]
            if missing:
                raise TaskFileError(
                    f"{path}:{lineno}: missing string field(s) {missing}; "
                    f"this format needs {list(required)} on every line"
                )
            yield lineno, row


def load_gsm8k_jsonl(path: str | os.PathLike) -> list[dict]:
    """Tasks from a GSM8K-format file: ``question`` and ``answer`` (worked solution ending in
    ``#### n``)."""
    tasks = []
    for lineno, row in _read_jsonl(path, ("question", "answer")):
        gold = extract_answer(row["answer"])
        if gold is None:
            raise TaskFileError(f"{path}:{lineno}: the answer has no '#### <number>' final line")
        steps = row["answer"][: row["answer"].rfind("####")].strip()
        tasks.append(
            {
                "task_id": str(row.get("id", f"gsm8k-{lineno}")),
                "prompt": f"Question: {row['question'].strip()}\nAnswer:\n",
                "answer": gold.replace(",", ""),
                "level": 0,
                "solution": (steps + "\n" if steps else "") + f"#### {gold}\n",
            }
        )
    if not tasks:
        raise TaskFileError(f"{path}: no tasks found; the file is empty")
    return tasks


def load_math_jsonl(path: str | os.PathLike) -> list[dict]:
    """Tasks from a MATH-format file: ``problem`` and ``solution`` with a final ``\\boxed{...}``;
    the level is read from ``level`` ("Level 3") when present."""
    tasks = []
    for lineno, row in _read_jsonl(path, ("problem", "solution")):
        gold = extract_answer(row["solution"])
        if gold is None:
            raise TaskFileError(f"{path}:{lineno}: the solution has no \\boxed{{...}} answer")
        level = 0
        digits = "".join(ch for ch in str(row.get("level", "")) if ch.isdigit())
        if digits:
            level = int(digits)
        tasks.append(
            {
                "task_id": str(row.get("unique_id", row.get("id", f"math-{lineno}"))),
                "prompt": f"Problem: {row['problem'].strip()}\nSolution:\n",
                "answer": gold,
                "level": level,
                "solution": row["solution"].strip() + f"\n#### {gold}\n",
                "numeric": parse_number(gold) is not None,
            }
        )
    if not tasks:
        raise TaskFileError(f"{path}: no tasks found; the file is empty")
    return tasks


def load_tasks(path: str | os.PathLike) -> list[dict]:
    """Tasks from a JSONL file in GSM8K or MATH format, told apart by the first line's fields."""
    for _, row in _read_jsonl(path, ()):
        if "question" in row:
            return load_gsm8k_jsonl(path)
        if "problem" in row:
            return load_math_jsonl(path)
        raise TaskFileError(
            f"{path}: unknown format (fields {sorted(row)}); expected GSM8K "
            "('question', 'answer') or MATH ('problem', 'solution')"
        )
    raise TaskFileError(f"{path}: no tasks found; the file is empty")
