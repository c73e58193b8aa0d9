"""DSTC preference construction (Liu et al., 2024, "DSTC: Direct Preference Learning with Only
Self-Generated Tests and Code to Improve Code LMs", Sec. 3).

Every sampled solution is run against every sampled test: ``M[i, j] = 1`` when code *i* passes test
*j*. Minimax selection (Sec. 3.1) picks

- chosen: the code that passes the most tests, with the tests it passes that the fewest codes pass
  (the strictest tests it survives: max over codes, min over tests);
- rejected: the code that passes the fewest tests, with the tests it fails that the most codes pass
  (the most lenient tests it still fails: min over codes, max over tests);

and only when the chosen code passes strictly more tests than the rejected one. Code-test concatenation
(Sec. 3.2): the pair's responses are code followed by its tests. When the task has ground-truth tests,
plain pairs (code only) come from them instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MinimaxSelection", "ground_truth_pairs", "minimax_pairs", "minimax_select", "pass_matrix"]


@dataclass(frozen=True)
class MinimaxSelection:
    chosen_code: int
    chosen_tests: tuple[int, ...]
    rejected_code: int
    rejected_tests: tuple[int, ...]
    chosen_passes: int
    """Tests the chosen code passes (row sum)."""
    rejected_passes: int


def minimax_select(matrix: np.ndarray, *, num_tests: int = 1) -> MinimaxSelection | None:
    """DSTC's minimax rule on a ``[codes, tests]`` pass matrix; ``None`` when no code passes more tests
    than another (no quality gap) or the matrix is empty. Ties go to the lowest index."""
    m = np.asarray(matrix, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"the pass matrix must be 2-D [codes, tests], got shape {m.shape}")
    if m.size == 0:
        return None
    rows, cols = m.sum(1), m.sum(0)
    best, worst = int(np.argmax(rows)), int(np.argmin(rows))
    if rows[best] <= rows[worst]:
        return None
    passed = np.flatnonzero(m[best])
    failed = np.flatnonzero(~m[worst])
    chosen_tests = passed[np.argsort(cols[passed], kind="stable")][:num_tests]
    rejected_tests = failed[np.argsort(-cols[failed], kind="stable")][:num_tests]
    return MinimaxSelection(best, tuple(int(j) for j in chosen_tests), worst,
                            tuple(int(j) for j in rejected_tests), int(rows[best]), int(rows[worst]))


def _tests_text(tests: Sequence[str], idx: Sequence[int]) -> str:
    return "".join(tests[j].rstrip("\n") + "\n" for j in idx)


def minimax_pairs(task: dict, codes: Sequence[str], tests: Sequence[str], matrix: np.ndarray, *,
                  num_tests: int = 1, end: str = "# end\n", iteration: int = 0) -> list[dict]:
    """At most one DSTC pair for ``task``: ``chosen`` / ``rejected`` are code (a body) followed by the
    selected tests and ``end``, both continuing ``task["prompt"]`` (record schema: pair)."""
    sel = minimax_select(matrix, num_tests=num_tests)
    if sel is None or codes[sel.chosen_code] == codes[sel.rejected_code]:
        return []
    return [{"prompt": task["prompt"], "prefix": "",
             "chosen": codes[sel.chosen_code] + _tests_text(tests, sel.chosen_tests) + end,
             "rejected": codes[sel.rejected_code] + _tests_text(tests, sel.rejected_tests) + end,
             "chosen_q": sel.chosen_passes / max(1, len(tests)), "rejected_q": sel.rejected_passes / max(1, len(tests)),
             "chosen_visits": 1, "rejected_visits": 1, "task_id": task.get("task_id", ""), "node_id": 0,
             "iteration": iteration, "source": "dstc"}]


def ground_truth_pairs(task: dict, codes: Sequence[str], passed: Sequence[bool], *, max_pairs: int = 2,
                       end: str = "# end\n", iteration: int = 0) -> list[dict]:
    """Plain pairs (code only): distinct passing codes against distinct failing ones, at most
    ``max_pairs``."""
    good = list(dict.fromkeys(c for c, p in zip(codes, passed) if p))
    bad = list(dict.fromkeys(c for c, p in zip(codes, passed) if not p))
    pairs = []
    for i in range(min(max_pairs, len(good) and len(bad) and max(len(good), len(bad)))):
        pairs.append({"prompt": task["prompt"], "prefix": "", "chosen": good[i % len(good)] + end,
                      "rejected": bad[i % len(bad)] + end, "chosen_q": 1.0, "rejected_q": 0.0,
                      "chosen_visits": 1, "rejected_visits": 1, "task_id": task.get("task_id", ""), "node_id": 0,
                      "iteration": iteration, "source": "ground-truth"})
    return pairs


def pass_matrix(sandbox, task: dict, codes: Sequence[str], tests: Sequence[str]) -> np.ndarray:
    """``[len(codes), len(tests)]`` booleans: every code run against every test, one sandbox job per code
    (each test gets its own verdict), in parallel."""
    from envs.code_env import task_job

    if not codes or not tests:
        return np.zeros((len(codes), len(tests)), dtype=bool)
    results = sandbox.run_many([task_job(task, c, tests) for c in codes])
    return np.array([r.passed for r in results], dtype=bool)
