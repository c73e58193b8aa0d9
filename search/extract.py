"""Preference records from searched trees, in the record schema of DESIGN.md.

Step-level pairs follow MCTS-DPO (Sec. 2.2) and Step-DPO: at every node whose children differ in
Q by at least ``min_q_gap``, the highest-Q child is preferred to the lowest-Q child, both as
continuations of ``prompt + prefix``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from search.kernels import best_worst_children
from search.tree import Tree

__all__ = ["extract_pairs", "extract_trajectories"]


def extract_pairs(
    tree: Tree,
    *,
    prompts: Sequence[str],
    task_ids: Sequence[str],
    iteration: int = 0,
    min_q_gap: float = 0.5,
    min_visits: int = 1,
) -> list[dict]:
    """One pair per node whose best and worst child differ in Q by at least ``min_q_gap``.

    Returns records ``{"prompt", "prefix", "chosen", "rejected", "chosen_q", "rejected_q",
    "chosen_visits", "rejected_visits", "task_id", "node_id", "iteration"}``, ordered by tree then
    node index.
    """
    best, worst, gap = best_worst_children(tree.first_child, tree.num_children, tree.visits,
                                           tree.value_sum, tree.node_count, int(min_visits))
    records = []
    for b, node in zip(*np.nonzero((best >= 0) & (gap >= min_q_gap - 1e-12))):
        b, node = int(b), int(node)
        w, l_ = int(best[b, node]), int(worst[b, node])
        records.append(
            {
                "prompt": prompts[b],
                "prefix": tree.prefix_text(b, node),
                "chosen": tree.texts[b][w],
                "rejected": tree.texts[b][l_],
                "chosen_q": tree.q(b, w),
                "rejected_q": tree.q(b, l_),
                "chosen_visits": int(tree.visits[b, w]),
                "rejected_visits": int(tree.visits[b, l_]),
                "task_id": task_ids[b],
                "node_id": node,
                "iteration": iteration,
            }
        )
    return records


def extract_trajectories(
    tree: Tree, *, prompts: Sequence[str], task_ids: Sequence[str], iteration: int = 0
) -> list[dict]:
    """Every root-to-terminal path in the trees: ``{"prompt", "steps", "reward", "correct",
    "task_id", "iteration"}`` (``correct`` is ``reward > 0``)."""
    out = []
    for b in range(tree.batch_size):
        for node in np.flatnonzero(tree.terminal[b, : tree.node_count[b]]):
            node = int(node)
            if node == 0:
                continue
            reward = float(tree.reward[b, node])
            out.append(
                {
                    "prompt": prompts[b],
                    "steps": [tree.texts[b][i] for i in tree.path(b, node)],
                    "reward": reward,
                    "correct": reward > 0,
                    "task_id": task_ids[b],
                    "iteration": iteration,
                }
            )
    return out
