"""Preference records from searched trees, in the record schema of DESIGN.md.

Step-level pairs follow MCTS-DPO (Sec. 2.2) and Step-DPO: at every node whose children differ in
Q by at least ``min_q_gap``, the highest-Q child is preferred to the lowest-Q child, both as
continuations of ``prompt + prefix``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from search.kernels import best_worst_children
from search.tree import Tree

__all__ = ["extract_pairs", "extract_path_lists", "extract_sibling_lists", "extract_trajectories", "tree_summary"]


def _pair_record(tree: Tree, b: int, node: int, w: int, l_: int, prompts, task_ids, iteration: int,
                 smoothing: bool) -> dict:
    rec = {
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
    if smoothing:
        nw, nl = rec["chosen_visits"], rec["rejected_visits"]
        rec["label_smoothing"] = min(1.0 - nw / (nw + nl), 0.5) if nw + nl else 0.5
    return rec


def extract_pairs(
    tree: Tree,
    *,
    prompts: Sequence[str],
    task_ids: Sequence[str],
    iteration: int = 0,
    min_q_gap: float = 0.5,
    min_visits: int = 1,
    mode: Literal["best-worst", "all"] = "best-worst",
    visit_smoothing: bool = False,
) -> list[dict]:
    """Step-level pairs from sibling nodes.

    ``mode="best-worst"``: at most one pair per node, its highest-Q vs its lowest-Q child.
    ``mode="all"``: every ordered sibling pair whose Q gap is at least ``min_q_gap``.
    Children with fewer than ``min_visits`` visits are ignored. With ``visit_smoothing`` each
    record carries ``label_smoothing`` = min(1 - N_w / (N_w + N_l), 0.5) (MCTS-DPO's confidence
    from visit counts) for conservative DPO.

    Returns records ``{"prompt", "prefix", "chosen", "rejected", "chosen_q", "rejected_q",
    "chosen_visits", "rejected_visits", "task_id", "node_id", "iteration"}``, ordered by tree, node,
    then chosen/rejected index.
    """
    if mode not in ("best-worst", "all"):
        raise ValueError(f"mode must be 'best-worst' or 'all', got {mode!r}")
    records = []
    if mode == "best-worst":
        best, worst, gap = best_worst_children(tree.first_child, tree.num_children, tree.visits,
                                               tree.value_sum, tree.node_count, int(min_visits))
        for b, node in zip(*np.nonzero((best >= 0) & (gap >= min_q_gap - 1e-12))):
            records.append(_pair_record(tree, int(b), int(node), int(best[b, node]), int(worst[b, node]),
                                        prompts, task_ids, iteration, visit_smoothing))
        return records
    for b in range(tree.batch_size):
        for node in np.flatnonzero(tree.num_children[b, : tree.node_count[b]] >= 2):
            kids = [c for c in tree.children(b, int(node)) if tree.visits[b, c] >= max(min_visits, 1)]
            for w in kids:
                for l_ in kids:
                    if tree.q(b, w) - tree.q(b, l_) >= min_q_gap - 1e-12 and w != l_:
                        records.append(_pair_record(tree, b, int(node), w, l_, prompts, task_ids, iteration,
                                                    visit_smoothing))
    return records


def extract_sibling_lists(
    tree: Tree, *, prompts: Sequence[str], task_ids: Sequence[str], iteration: int = 0,
    min_size: int = 2, min_visits: int = 1,
) -> list[dict]:
    """For every node with at least ``min_size`` visited children: the children ranked by Q (best
    first), ``{"prompt", "prefix", "responses", "scores", "task_id", "iteration"}`` (TPO's lists)."""
    out = []
    for b in range(tree.batch_size):
        for node in np.flatnonzero(tree.num_children[b, : tree.node_count[b]] >= min_size):
            kids = [c for c in tree.children(b, int(node)) if tree.visits[b, c] >= max(min_visits, 1)]
            if len(kids) < min_size:
                continue
            kids.sort(key=lambda c, b=b: -tree.q(b, c))
            out.append({"prompt": prompts[b], "prefix": tree.prefix_text(b, int(node)),
                        "responses": [tree.texts[b][c] for c in kids], "scores": [tree.q(b, c) for c in kids],
                        "task_id": task_ids[b], "iteration": iteration})
    return out


def extract_path_lists(
    tree: Tree, *, prompts: Sequence[str], task_ids: Sequence[str], iteration: int = 0,
    max_paths: int = 8, min_size: int = 2,
) -> list[dict]:
    """Per tree, up to ``max_paths`` root-to-terminal paths ranked by their final reward, ties by
    the Q of their last step (TPO's response-level lists; ``prefix`` is empty)."""
    out = []
    for b in range(tree.batch_size):
        ends = [int(i) for i in np.flatnonzero(tree.terminal[b, : tree.node_count[b]]) if i != 0]
        ends.sort(key=lambda i, b=b: (-tree.reward[b, i], -tree.q(b, i), i))
        ends = ends[:max_paths]
        if len(ends) < min_size:
            continue
        out.append({"prompt": prompts[b], "prefix": "",
                    "responses": ["".join(tree.texts[b][i] for i in tree.path(b, e)) for e in ends],
                    "scores": [float(tree.reward[b, e]) for e in ends], "task_id": task_ids[b],
                    "iteration": iteration})
    return out


def tree_summary(tree: Tree, *, min_q_gap: float = 0.5) -> dict:
    """Size and shape of a batch of trees: nodes, deepest node, mean branching of internal nodes,
    and the share of internal nodes with at least two children that yield a best/worst pair."""
    counts = tree.node_count
    internal = branching = with_pair = multi = 0
    max_depth = 0
    _, _, gap = best_worst_children(tree.first_child, tree.num_children, tree.visits, tree.value_sum,
                                    tree.node_count, 1)
    for b in range(tree.batch_size):
        k = tree.num_children[b, : counts[b]]
        internal += int((k > 0).sum())
        branching += int(k.sum())
        multi += int((k >= 2).sum())
        with_pair += int(((k >= 2) & (gap[b, : counts[b]] >= min_q_gap - 1e-12)).sum())
        max_depth = max(max_depth, int(tree.depth[b, : counts[b]].max()))
    return {"trees": tree.batch_size, "nodes": int(counts.sum()), "max_depth": max_depth,
            "mean_branching": branching / internal if internal else 0.0,
            "pair_yield": with_pair / multi if multi else 0.0}


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
