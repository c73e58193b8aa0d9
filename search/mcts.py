"""Monte-Carlo tree search over language-model steps, many trees at once.

The variant of MCTS-DPO (Xie et al., 2024, "Monte Carlo Tree Search Boosts Reasoning via
Iterative Preference Learning", Sec. 2.1): each round selects one leaf per tree by PUCT (eq. 1),
expands it with the policy's sampled next steps (identical texts merged, prior from the
length-normalised log-probability), values every new child (terminal children by their reward,
open ones by ``evaluate_fn``) and backs the values up as running means.
"""

from __future__ import annotations

import math

import numpy as np

from search.kernels import backup, puct_select
from search.tree import Tree
from search.types import Candidate, EvaluateFn, ExpandFn, ProgressFn

__all__ = ["merge_candidates", "mcts"]


def merge_candidates(candidates: list[Candidate]) -> tuple[list[Candidate], np.ndarray]:
    """Drop repeated texts and compute priors: softmax of length-normalised log-probabilities
    (MCTS-DPO's p(s)^(1/|s|), normalised over siblings). Returns the unique candidates and priors."""
    unique: dict[str, Candidate] = {}
    for c in candidates:
        unique.setdefault(c.text, c)
    kept = list(unique.values())
    if not kept:
        return kept, np.zeros(0)
    scores = np.array([c.logprob / max(c.num_tokens, 1) for c in kept], np.float64)
    scores = np.exp(scores - scores.max())
    return kept, scores / scores.sum()


def mcts(
    tree: Tree,
    *,
    expand_fn: ExpandFn,
    evaluate_fn: EvaluateFn,
    num_simulations: int,
    c_puct: float = 1.0,
    max_depth: int = 16,
    progress: ProgressFn | None = None,
) -> Tree:
    """Run ``num_simulations`` rounds of select → expand → evaluate → backup on every tree.

    Each round makes one batched ``expand_fn`` call (one leaf per tree) and one batched
    ``evaluate_fn`` call (every new open child). A selected leaf that is terminal, or at
    ``max_depth``, or that the policy could not extend, is not expanded: its own value (reward for
    terminal nodes, else its current Q) is backed up again, which sharpens the statistics along
    its path just as a repeat visit does in AlphaZero.
    """
    if num_simulations < 0:
        raise ValueError(f"num_simulations must be >= 0, got {num_simulations}")
    if not (math.isfinite(c_puct) and c_puct >= 0):
        raise ValueError(f"c_puct must be a finite number >= 0, got {c_puct}")
    bsz = tree.batch_size
    leaves = np.zeros(bsz, np.int32)
    all_trees = np.arange(bsz, dtype=np.int32)
    for sim in range(num_simulations):
        puct_select(tree.first_child, tree.num_children, tree.visits, tree.value_sum, tree.prior,
                    tree.terminal, c_puct, leaves)
        expandable = ~tree.terminal[all_trees, leaves] & (tree.depth[all_trees, leaves] < max_depth)
        back_b, back_n, back_v = [], [], []
        for b in np.flatnonzero(~expandable):
            node = int(leaves[b])
            value = tree.reward[b, node] if tree.terminal[b, node] else tree.q(b, node)
            back_b.append(b)
            back_n.append(node)
            back_v.append(value)
        exp_b = all_trees[expandable]
        exp_n = leaves[expandable]
        new_b, new_n, open_b, open_n = [], [], [], []
        if exp_b.size:
            proposals = expand_fn(tree, exp_b, exp_n)
            if len(proposals) != exp_b.size:
                raise ValueError(f"expand_fn returned {len(proposals)} lists for {exp_b.size} nodes")
            for b, node, cands in zip(exp_b.tolist(), exp_n.tolist(), proposals):
                kept, priors = merge_candidates(cands)
                if not kept:  # the policy produced nothing usable: a dead end worth 0
                    tree.terminal[b, node] = True
                    back_b.append(b)
                    back_n.append(node)
                    back_v.append(0.0)
                    continue
                idx = tree.add_children(
                    b, node,
                    [c.text for c in kept], priors, [c.reward for c in kept],
                    [c.terminal for c in kept], [c.state for c in kept],
                )
                for c, i in zip(kept, idx):
                    new_b.append(b)
                    new_n.append(i)
                    if not c.terminal:
                        open_b.append(b)
                        open_n.append(i)
        values = {}
        if open_b:
            ob = np.asarray(open_b, np.int32)
            on = np.asarray(open_n, np.int32)
            est = np.asarray(evaluate_fn(tree, ob, on), np.float64)
            if est.shape != (len(open_b),):
                raise ValueError(f"evaluate_fn returned shape {est.shape}, expected ({len(open_b)},)")
            values = {(b, n): v for b, n, v in zip(open_b, open_n, est.tolist())}
        for b, n in zip(new_b, new_n):
            back_b.append(b)
            back_n.append(n)
            back_v.append(values.get((b, n), tree.reward[b, n]))
        if back_b:
            backup(tree.parent, tree.visits, tree.value_sum, np.asarray(back_b, np.int32),
                   np.asarray(back_n, np.int32), np.asarray(back_v, np.float64))
        if progress is not None:
            progress(sim + 1, num_simulations)
    return tree
