"""Preference records from searched trees, in the record schema of DESIGN.md.

Step-level pairs follow MCTS-DPO (Sec. 2.2) and Step-DPO: at every node whose children differ in
Q by at least ``min_q_gap``, the highest-Q child is preferred to the lowest-Q child, both as
continuations of ``prompt + prefix``. Identical sibling texts are merged first (one step sampled
twice is one child), and siblings can be ranked by Agent Q's mix of Q and a critic's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from search.kernels import best_worst_children
from search.tree import Tree

__all__ = ["extract_pairs", "extract_path_lists", "extract_sibling_lists", "extract_trajectories", "tree_summary"]


class _Stats:
    """The visits and Q that extraction ranks siblings by. Children of a node with the same text
    are one step sampled more than once: they count as one, the first of them, holding all their
    visits and value (the others count as unvisited). With ``alpha < 1``, a node with a critic
    score ranks by ``alpha * Q + (1 - alpha) * critic`` (Agent Q's mix, Sec. 4.3), one without by Q."""

    def __init__(self, tree: Tree, alpha: float = 1.0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        visits, value_sum = tree.visits, tree.value_sum
        for b in range(tree.batch_size):
            texts = tree.texts[b]
            for node in np.flatnonzero(tree.num_children[b, : tree.node_count[b]] >= 2).tolist():
                kids = tree.children(b, node)
                first: dict[str, int] = {}
                for c in kids:
                    first.setdefault(texts[c], c)
                if len(first) == len(kids):
                    continue
                if visits is tree.visits:
                    visits, value_sum = visits.copy(), value_sum.copy()
                for c in kids:
                    f = first[texts[c]]
                    if f != c:
                        visits[b, f] += visits[b, c]
                        value_sum[b, f] += value_sum[b, c]
                        visits[b, c], value_sum[b, c] = 0, 0.0
        self.q = np.divide(value_sum, visits, out=np.zeros(value_sum.shape), where=visits > 0)  # the search's Q
        self.mixed = alpha < 1.0
        self.rank = self.q  # what siblings are ranked by
        if self.mixed:
            critic = tree.critic
            self.rank = np.where(np.isnan(critic), self.q, alpha * self.q + (1.0 - alpha) * np.nan_to_num(critic))
        self.visits = visits
        self.value_sum = self.rank * visits  # what the kernels read: value_sum / visits = the ranking value

    def kids(self, tree: Tree, b: int, node: int, min_visits: int) -> list[int]:
        """The children of ``node`` that count, with at least ``min_visits`` (and one) visits."""
        return [c for c in tree.children(b, node) if self.visits[b, c] >= max(min_visits, 1)]


def _pair_record(tree: Tree, stats: _Stats, b: int, node: int, w: int, l_: int, prompts, task_ids,
                 iteration: int, smoothing: bool) -> dict:
    rec = {
        "prompt": prompts[b],
        "prefix": tree.prefix_text(b, node),
        "chosen": tree.texts[b][w],
        "rejected": tree.texts[b][l_],
        "chosen_q": float(stats.q[b, w]),
        "rejected_q": float(stats.q[b, l_]),
        "chosen_visits": int(stats.visits[b, w]),
        "rejected_visits": int(stats.visits[b, l_]),
        "task_id": task_ids[b],
        "node_id": node,
        "iteration": iteration,
    }
    if stats.mixed:
        rec["chosen_score"], rec["rejected_score"] = float(stats.rank[b, w]), float(stats.rank[b, l_])
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
    alpha: float = 1.0,
) -> list[dict]:
    """Step-level pairs from sibling nodes.

    ``mode="best-worst"``: at most one pair per node, its highest-Q vs its lowest-Q child.
    ``mode="all"``: every ordered sibling pair whose Q gap is at least ``min_q_gap`` (and above 0:
    siblings of equal Q make no pair).
    Children with fewer than ``min_visits`` visits are ignored; children with the same text count
    as one, holding their summed visits and value. With ``visit_smoothing`` each
    record carries ``label_smoothing`` = min(1 - N_w / (N_w + N_l), 0.5) (MCTS-DPO's confidence
    from visit counts) for conservative DPO. ``alpha < 1``: siblings are ranked by Agent Q's mix
    ``alpha * Q + (1 - alpha) * critic`` where the tree holds a critic score (``tree.critic``);
    ``chosen_q`` / ``rejected_q`` stay the search's Q, and the records also carry the mixed values
    as ``chosen_score`` / ``rejected_score``; ``min_q_gap`` applies to those.

    Returns records ``{"prompt", "prefix", "chosen", "rejected", "chosen_q", "rejected_q",
    "chosen_visits", "rejected_visits", "task_id", "node_id", "iteration"}``, ordered by tree, node,
    then chosen/rejected index.
    """
    if mode not in ("best-worst", "all"):
        raise ValueError(f"mode must be 'best-worst' or 'all', got {mode!r}")
    stats = _Stats(tree, alpha)
    records = []
    if mode == "best-worst":
        best, worst, gap = best_worst_children(tree.first_child, tree.num_children, stats.visits,
                                               stats.value_sum, tree.node_count, int(min_visits))
        for b, node in zip(*np.nonzero((best >= 0) & (gap >= min_q_gap - 1e-12) & (gap > 0))):
            records.append(_pair_record(tree, stats, int(b), int(node), int(best[b, node]), int(worst[b, node]),
                                        prompts, task_ids, iteration, visit_smoothing))
        return records
    for b in range(tree.batch_size):
        for node in np.flatnonzero(tree.num_children[b, : tree.node_count[b]] >= 2).tolist():
            kids = stats.kids(tree, b, node, min_visits)
            for w in kids:
                for l_ in kids:
                    gap = stats.rank[b, w] - stats.rank[b, l_]
                    if gap > 0 and gap >= min_q_gap - 1e-12:
                        records.append(_pair_record(tree, stats, b, node, w, l_, prompts, task_ids, iteration,
                                                    visit_smoothing))
    return records


def extract_sibling_lists(
    tree: Tree, *, prompts: Sequence[str], task_ids: Sequence[str], iteration: int = 0,
    min_size: int = 2, min_visits: int = 1, alpha: float = 1.0,
) -> list[dict]:
    """For every node with at least ``min_size`` visited children (children with the same text
    counting as one): the children ranked by Q (best first; by Agent Q's mix with ``alpha < 1``,
    see :func:`extract_pairs`), ``{"prompt", "prefix", "responses", "scores", "task_id",
    "iteration"}`` (TPO's lists)."""
    stats = _Stats(tree, alpha)
    out = []
    for b in range(tree.batch_size):
        for node in np.flatnonzero(tree.num_children[b, : tree.node_count[b]] >= min_size).tolist():
            kids = stats.kids(tree, b, node, min_visits)
            if len(kids) < min_size:
                continue
            kids.sort(key=lambda c, b=b: -stats.rank[b, c])
            out.append({"prompt": prompts[b], "prefix": tree.prefix_text(b, node),
                        "responses": [tree.texts[b][c] for c in kids],
                        "scores": [float(stats.rank[b, c]) for c in kids], "task_id": task_ids[b],
                        "iteration": iteration})
    return out


def extract_path_lists(
    tree: Tree, *, prompts: Sequence[str], task_ids: Sequence[str], iteration: int = 0,
    max_paths: int = 8, min_size: int = 2,
) -> list[dict]:
    """Per tree, up to ``max_paths`` root-to-terminal paths ranked by their return (the sum of
    their steps' rewards: the final reward when only the last step is rewarded), ties by the Q of
    their last step (TPO's response-level lists; ``prefix`` is empty)."""
    out = []
    for b in range(tree.batch_size):
        ends = [int(i) for i in np.flatnonzero(tree.terminal[b, : tree.node_count[b]]) if i != 0]
        paths = {e: tree.path(b, e) for e in ends}
        returns = {e: float(tree.reward[b, paths[e]].sum()) for e in ends}
        ends.sort(key=lambda i, b=b: (-returns[i], -tree.q(b, i), i))
        ends = ends[:max_paths]
        if len(ends) < min_size:
            continue
        out.append({"prompt": prompts[b], "prefix": "",
                    "responses": ["".join(tree.texts[b][i] for i in paths[e]) for e in ends],
                    "scores": [returns[e] for e in ends], "task_id": task_ids[b], "iteration": iteration})
    return out


def tree_summary(tree: Tree, *, min_q_gap: float = 0.5) -> dict:
    """Size and shape of a batch of trees: nodes, deepest node, mean branching of internal nodes
    (those with children), and the share of internal nodes that yield a best/worst pair (as
    :func:`extract_pairs` finds them with ``min_q_gap``)."""
    counts = tree.node_count
    internal = branching = with_pair = 0
    max_depth = 0
    stats = _Stats(tree)
    _, _, gap = best_worst_children(tree.first_child, tree.num_children, stats.visits, stats.value_sum,
                                    tree.node_count, 1)
    for b in range(tree.batch_size):
        k = tree.num_children[b, : counts[b]]
        g = gap[b, : counts[b]]
        internal += int((k > 0).sum())
        branching += int(k.sum())
        with_pair += int(((g >= min_q_gap - 1e-12) & (g > 0)).sum())
        max_depth = max(max_depth, int(tree.depth[b, : counts[b]].max()))
    return {"trees": tree.batch_size, "nodes": int(counts.sum()), "max_depth": max_depth,
            "mean_branching": branching / internal if internal else 0.0,
            "pair_yield": with_pair / internal if internal else 0.0}


def extract_trajectories(
    tree: Tree, *, prompts: Sequence[str], task_ids: Sequence[str], iteration: int = 0
) -> list[dict]:
    """Every root-to-terminal path in the trees: ``{"prompt", "steps", "reward", "correct",
    "task_id", "iteration"}``; ``reward`` is the path's return, the sum of its steps' rewards (the
    final outcome when only the last step is rewarded, as in the math environment), and
    ``correct`` is ``reward > 0``."""
    out = []
    for b in range(tree.batch_size):
        for node in np.flatnonzero(tree.terminal[b, : tree.node_count[b]]):
            node = int(node)
            if node == 0:
                continue
            path = tree.path(b, node)
            reward = float(tree.reward[b, path].sum())
            out.append(
                {
                    "prompt": prompts[b],
                    "steps": [tree.texts[b][i] for i in path],
                    "reward": reward,
                    "correct": reward > 0,
                    "task_id": task_ids[b],
                    "iteration": iteration,
                }
            )
    return out
