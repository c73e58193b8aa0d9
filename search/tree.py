"""A batch of search trees stored as a structure of arrays (after mctx's ``Tree``).

Every array has shape ``[B, N]``: ``B`` trees searched together, ``N`` node slots per tree (grown
by doubling). Node ``ROOT_INDEX`` (0) is each tree's root; a node's children occupy the contiguous
range ``first_child[b, i] : first_child[b, i] + num_children[b, i]``. The text of the step that
leads to a node and any environment state live in the side lists ``texts[b][i]`` and
``states[b][i]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["NO_PARENT", "ROOT_INDEX", "Tree"]

ROOT_INDEX = 0
NO_PARENT = -1


class Tree:
    """``B`` search trees, one per task.

    Attributes (all ``[B, N]`` unless noted; only the first ``node_count[b]`` slots of row ``b``
    are meaningful):
        parent: index of the parent node, ``NO_PARENT`` for roots and unused slots.
        depth: number of steps from the root (root = 0).
        first_child: index of the first child, -1 while unexpanded.
        num_children: number of children (0 for leaves).
        visits: visit count N.
        value_sum: sum of backed-up values W (Q = W / N: the return of the step leading to the node,
            its reward and what follows; see :mod:`search.mcts`); 0 while the node is unvisited.
        prior: prior probability of the step leading to the node (P in PUCT).
        reward: reward the environment gave for the step leading to the node.
        terminal: True when the step ended the episode; a terminal node never has children.
        critic: a critic's score of the step leading to the node (NaN when none was given), kept
            beside the search's own Q for extraction to mix (Agent Q's alpha).
        node_count: ``[B]`` number of used slots per tree.
        texts, states: ``B`` lists of per-node step text and environment state.
        meta: ``B`` dicts (or None) of the caller's data about each tree (task id, prompt...),
            carried through JSON export (:func:`search.export.tree_to_dict`) unchanged.
    """

    def __init__(self, batch_size: int, capacity: int = 64, root_states: Sequence[Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        capacity = max(int(capacity), 2)
        b = batch_size
        self.parent = np.full((b, capacity), NO_PARENT, np.int32)
        self.depth = np.zeros((b, capacity), np.int32)
        self.first_child = np.full((b, capacity), -1, np.int32)
        self.num_children = np.zeros((b, capacity), np.int32)
        self.visits = np.zeros((b, capacity), np.int32)
        self.value_sum = np.zeros((b, capacity), np.float64)
        self.prior = np.zeros((b, capacity), np.float64)
        self.reward = np.zeros((b, capacity), np.float64)
        self.terminal = np.zeros((b, capacity), np.bool_)
        self.critic = np.full((b, capacity), np.nan, np.float64)
        self.node_count = np.ones(b, np.int32)
        self.prior[:, ROOT_INDEX] = 1.0
        self.texts: list[list[str]] = [[""] for _ in range(b)]
        states = list(root_states) if root_states is not None else [None] * b
        if len(states) != b:
            raise ValueError(f"got {len(states)} root states for {b} trees")
        self.states: list[list[Any]] = [[s] for s in states]
        self.meta: list[dict | None] = [None] * b

    _ARRAYS = ("parent", "depth", "first_child", "num_children", "visits", "value_sum", "prior",
               "reward", "terminal", "critic")
    _FILL = {"parent": NO_PARENT, "first_child": -1, "critic": np.nan}

    def reset(self, root_states: Sequence[Any] | None = None) -> Tree:
        """Empty every tree in place, keeping the arrays (and their capacity) for the next search:
        a search loop that reuses one ``Tree`` skips the allocation and the first-touch page faults
        of fresh memory. Only the roots are re-initialised: slots past ``node_count`` keep stale
        values, which nothing reads, since every allocation (:meth:`add_children`,
        :func:`~search.kernels.synthetic_search`) initialises each field of the slots it takes.
        The cost is therefore O(B), not O(B * N). Returns ``self``."""
        states = list(root_states) if root_states is not None else [None] * self.batch_size
        if len(states) != self.batch_size:
            raise ValueError(f"got {len(states)} root states for {self.batch_size} trees")
        for name in self._ARRAYS:
            getattr(self, name)[:, ROOT_INDEX] = self._FILL.get(name, 0)
        self.node_count[:] = 1
        self.prior[:, ROOT_INDEX] = 1.0
        self.texts = [[""] for _ in range(self.batch_size)]
        self.states = [[s] for s in states]
        self.meta = [None] * self.batch_size
        return self

    @property
    def batch_size(self) -> int:
        return self.parent.shape[0]

    @property
    def capacity(self) -> int:
        return self.parent.shape[1]

    def __repr__(self) -> str:
        counts = self.node_count
        return (f"Tree({self.batch_size} trees, {int(counts.sum())} nodes (largest {int(counts.max())}), "
                f"{int(self.visits[:, 0].sum())} simulations, capacity {self.capacity}; "
                "search.format_tree(tree, b) shows tree b)")

    def _repr_html_(self) -> str:
        """The batch in a notebook: its first trees, each opening into its nodes
        (:func:`search.html.batch_html`)."""
        from search.html import batch_html

        return batch_html(self)

    def _ensure_capacity(self, needed: int) -> None:
        cap = self.capacity
        if needed <= cap:
            return
        while cap < needed:
            cap *= 2
        for name in self._ARRAYS:
            old = getattr(self, name)
            new = np.full((old.shape[0], cap), self._FILL.get(name, 0), old.dtype)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)

    def add_children(
        self,
        b: int,
        node: int,
        texts: Sequence[str],
        priors: Sequence[float],
        rewards: Sequence[float],
        terminals: Sequence[bool],
        states: Sequence[Any] | None = None,
    ) -> range:
        """Attach ``len(texts)`` children to ``node`` of tree ``b``; returns their indices."""
        if self.num_children[b, node] > 0:
            raise ValueError(f"node {node} of tree {b} is already expanded")
        if self.terminal[b, node]:
            raise ValueError(f"node {node} of tree {b} is terminal: the episode ended there, so it has no children")
        k = len(texts)
        start = int(self.node_count[b])
        self._ensure_capacity(start + k)
        sl = slice(start, start + k)
        self.parent[b, sl] = node
        self.depth[b, sl] = self.depth[b, node] + 1
        self.prior[b, sl] = priors
        self.reward[b, sl] = rewards
        self.terminal[b, sl] = terminals
        self.first_child[b, sl] = -1  # the slots may hold stale values after reset()
        self.num_children[b, sl] = 0
        self.visits[b, sl] = 0
        self.value_sum[b, sl] = 0.0
        self.critic[b, sl] = np.nan
        self.first_child[b, node] = start if k else -1
        self.num_children[b, node] = k
        self.node_count[b] = start + k
        self.texts[b].extend(texts)
        self.states[b].extend(states if states is not None else [None] * k)
        return range(start, start + k)

    def set_critic(self, tree_index: Sequence[int] | np.ndarray, node_index: Sequence[int] | np.ndarray,
                   scores: Sequence[float] | np.ndarray) -> None:
        """Record a critic's scores of nodes ``(tree_index[i], node_index[i])`` (see ``critic``):
        finite numbers, or NaN for none."""
        scores = np.asarray(scores, np.float64)
        if np.isinf(scores).any():
            raise ValueError("critic scores must be finite (NaN: no score)")
        self.critic[np.asarray(tree_index, np.intp), np.asarray(node_index, np.intp)] = scores

    def children(self, b: int, node: int) -> range:
        first = int(self.first_child[b, node])
        return range(first, first + int(self.num_children[b, node])) if first >= 0 else range(0)

    def q(self, b: int, node: int) -> float:
        """Mean backed-up value of a node (0 when unvisited)."""
        n = self.visits[b, node]
        return float(self.value_sum[b, node] / n) if n else 0.0

    def path(self, b: int, node: int) -> list[int]:
        """Node indices from the root's first step down to ``node`` (the root itself excluded)."""
        out = []
        while node != ROOT_INDEX and node != NO_PARENT:
            out.append(int(node))
            node = int(self.parent[b, node])
        return out[::-1]

    def reroot(self, b: int, node: int) -> str:
        """Make ``node`` the root of tree ``b`` and keep its subtree with all its statistics (the
        rest is dropped): search commits a step and continues from it, as MCTS-DPO does. Returns
        the text of the committed steps, which the caller appends to the tree's prompt."""
        committed = self.prefix_text(b, node)
        order = [int(node)]
        for n in order:  # breadth-first, so each node's children stay contiguous
            order.extend(self.children(b, n))
        new_index = np.full(self.capacity, -1, np.int64)
        new_index[order] = np.arange(len(order))
        idx = np.asarray(order)
        for name in self._ARRAYS:
            arr = getattr(self, name)
            row = arr[b, idx].copy()
            arr[b, :] = self._FILL.get(name, 0)
            arr[b, : len(order)] = row
        n = len(order)
        self.parent[b, 1:n] = new_index[self.parent[b, 1:n]]
        self.parent[b, 0] = NO_PARENT
        fc = self.first_child[b, :n]
        self.first_child[b, :n] = np.where(fc >= 0, new_index[np.maximum(fc, 0)], -1)
        self.depth[b, :n] -= self.depth[b, 0]
        self.prior[b, 0] = 1.0
        self.node_count[b] = n
        self.texts[b] = [""] + [self.texts[b][i] for i in order[1:]]
        self.states[b] = [self.states[b][i] for i in order]
        return committed

    def prefix_text(self, b: int, node: int) -> str:
        """The concatenated step texts from the root to ``node``."""
        texts = self.texts[b]
        return "".join(texts[i] for i in self.path(b, node))
