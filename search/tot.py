"""Tree-of-Thoughts search (Yao et al., 2023, "Tree of Thoughts", Sec. 3, Alg. 1 and 2) and plain
trajectory sampling, on the same array trees as MCTS, so extraction, export and viewing work the
same for every algorithm.

* ``tot_bfs``: breadth-first beam search: every frontier node is expanded, every new child is
  valued, and the ``beam_width`` best open children per tree form the next frontier.
* ``tot_dfs``: depth-first search with value pruning: children are visited best value first and a
  child whose value is below ``prune_below`` is not explored; each tree has a budget of
  expansions. All trees advance together, one node per tree per batched round.
* ``sample_trajectories``: K whole trajectories per task (the instance-level baseline), merged into
  a trie so that shared prefixes share nodes; node statistics are Monte-Carlo averages.

Every valued node is backed up like an MCTS leaf, so ``Q`` means the same thing in all trees.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from search.mcts import back_up, expand_nodes
from search.tree import Tree
from search.types import Candidate, EvaluateFn, ExpandFn, ProgressFn

__all__ = ["SampleFn", "sample_trajectories", "tot_bfs", "tot_dfs"]

SampleFn = Callable[[Tree, np.ndarray, np.ndarray, int], list[list[list[Candidate]]]]
"""``sample_fn(tree, tree_index [M], node_index [M], k) -> M lists of k trajectories``, each
trajectory a list of steps (Candidates) from the node to the end of the episode."""


def _node_value(tree: Tree, b: int, i: int) -> float:
    return float(tree.reward[b, i]) if tree.terminal[b, i] else tree.q(b, i)


def tot_bfs(
    tree: Tree,
    *,
    expand_fn: ExpandFn,
    evaluate_fn: EvaluateFn,
    beam_width: int = 4,
    max_depth: int = 16,
    progress: ProgressFn | None = None,
) -> Tree:
    """Breadth-first ToT with a beam of ``beam_width`` open nodes per tree and level."""
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    frontier = [[0] for _ in range(tree.batch_size)]
    for level in range(max_depth):
        tb = np.array([b for b, f in enumerate(frontier) for _ in f], np.int32)
        nb = np.array([n for f in frontier for n in f], np.int32)
        if not len(tb):
            break
        back_up(tree, *expand_nodes(tree, tb, nb, expand_fn=expand_fn, evaluate_fn=evaluate_fn))
        nxt: list[list[int]] = [[] for _ in range(tree.batch_size)]
        for b, f in enumerate(frontier):
            kids = [c for n in f for c in tree.children(b, n) if not tree.terminal[b, c]]
            kids.sort(key=lambda c, b=b: -_node_value(tree, b, c))  # stable: ties keep tree order
            nxt[b] = kids[:beam_width]
        frontier = nxt
        if progress is not None:
            progress(level + 1, max_depth)
    return tree


def tot_dfs(
    tree: Tree,
    *,
    expand_fn: ExpandFn,
    evaluate_fn: EvaluateFn,
    max_expansions: int = 16,
    prune_below: float = 0.5,
    stop_at_reward: float | None = 1.0,
    max_depth: int = 16,
    progress: ProgressFn | None = None,
) -> Tree:
    """Depth-first ToT with value pruning, ``max_expansions`` expansions per tree. A tree stops
    early once a terminal child earns at least ``stop_at_reward`` (None: never)."""
    if max_expansions < 1:
        raise ValueError(f"max_expansions must be >= 1, got {max_expansions}")
    stacks = [[0] for _ in range(tree.batch_size)]
    used = np.zeros(tree.batch_size, np.int64)
    for round_ in range(max_expansions):
        tb, nb = [], []
        for b, stack in enumerate(stacks):
            if stack and used[b] < max_expansions:
                tb.append(b)
                nb.append(stack.pop())
        if not tb:
            break
        tb_a, nb_a = np.asarray(tb, np.int32), np.asarray(nb, np.int32)
        back_up(tree, *expand_nodes(tree, tb_a, nb_a, expand_fn=expand_fn, evaluate_fn=evaluate_fn))
        for b, n in zip(tb, nb):
            used[b] += 1
            kids = list(tree.children(b, n))
            if stop_at_reward is not None and any(tree.terminal[b, c] and tree.reward[b, c] >= stop_at_reward
                                                  for c in kids):
                stacks[b] = []
                continue
            good = [c for c in kids if not tree.terminal[b, c] and tree.depth[b, c] < max_depth
                    and _node_value(tree, b, c) >= prune_below]
            good.sort(key=lambda c, b=b: _node_value(tree, b, c))  # best last: popped first
            stacks[b].extend(good)
        if progress is not None:
            progress(round_ + 1, max_expansions)
    return tree


def sample_trajectories(
    tree: Tree,
    *,
    sample_fn: SampleFn,
    num_samples: int,
    progress: ProgressFn | None = None,
) -> Tree:
    """``num_samples`` whole trajectories from every root, merged into the tree as a trie; each
    trajectory's return is backed up from its last node (its last step's reward there, each step's
    own added on the way up; visits count trajectories)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    roots = np.zeros(tree.batch_size, np.int32)
    samples = sample_fn(tree, np.arange(tree.batch_size, dtype=np.int32), roots, num_samples)
    back_b, back_n, back_v = [], [], []
    for b, trajectories in enumerate(samples):
        # Build the trie in Python first: the array tree needs each node's children added at once.
        trie: dict = {}
        for traj in trajectories:
            level = trie
            for step in traj:
                entry = level.setdefault(step.text, [step, {}, 0])
                entry[2] += 1
                level = entry[1]
        ends: list[tuple[int, float]] = []
        pending: list[tuple[int, dict]] = [(0, trie)]
        while pending:
            node, level = pending.pop(0)
            if not level:
                continue
            entries = list(level.values())
            counts = np.array([e[2] for e in entries], np.float64)
            idx = tree.add_children(b, node, [e[0].text for e in entries], counts / counts.sum(),
                                    [e[0].reward for e in entries], [e[0].terminal for e in entries],
                                    [e[0].state for e in entries])
            for i, e in zip(idx, entries):
                pending.append((i, e[1]))
        # each trajectory's return, backed up from its last node (which adds the earlier steps' rewards)
        for traj in trajectories:
            node = 0
            for step in traj:
                node = next(c for c in tree.children(b, node) if tree.texts[b][c] == step.text)
            if node:
                ends.append((node, float(traj[-1].reward)))
        for node, value in ends:
            back_b.append(b)
            back_n.append(node)
            back_v.append(value)
    back_up(tree, back_b, back_n, back_v)
    if progress is not None:
        progress(1, 1)
    return tree
