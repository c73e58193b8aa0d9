"""numba kernels over the arrays of :class:`search.tree.Tree`.

Each kernel handles the whole batch of trees in one call: a call from Python costs about a
microsecond, so per-simulation calls would dominate the cost of the arithmetic itself.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["backup", "best_worst_children", "puct_select"]


@njit(cache=True)
def puct_select(first_child, num_children, visits, value_sum, prior, terminal, c_puct, out_leaf):
    """Descend every tree from its root by the PUCT rule until a leaf or a terminal node.

    Score of child c of node p (AlphaZero; MCTS-DPO eq. 1):
        Q(c) + c_puct * P(c) * sqrt(N(p)) / (1 + N(c)),  Q(c) = W(c) / N(c), 0 when N(c) = 0.
    Ties go to the lowest index. Shapes: arrays ``[B, N]``; ``out_leaf`` ``[B]`` (int32).
    """
    for b in range(first_child.shape[0]):
        node = 0
        while num_children[b, node] > 0 and not terminal[b, node]:
            first = first_child[b, node]
            sqrt_n = math.sqrt(max(visits[b, node], 1))
            best = first
            best_score = -np.inf
            for c in range(first, first + num_children[b, node]):
                n = visits[b, c]
                q = value_sum[b, c] / n if n > 0 else 0.0
                score = q + c_puct * prior[b, c] * sqrt_n / (1.0 + n)
                if score > best_score:
                    best_score = score
                    best = c
            node = best
        out_leaf[b] = node


@njit(cache=True)
def backup(parent, visits, value_sum, tree_index, node_index, values):
    """Add ``values[j]`` to node ``node_index[j]`` of tree ``tree_index[j]`` and to each of its
    ancestors, incrementing their visit counts (running-mean backup, Q = W / N)."""
    for j in range(tree_index.shape[0]):
        b = tree_index[j]
        node = node_index[j]
        v = values[j]
        while node >= 0:
            visits[b, node] += 1
            value_sum[b, node] += v
            node = parent[b, node]


@njit(cache=True)
def best_worst_children(first_child, num_children, visits, value_sum, node_count, min_visits):
    """For every node with at least two visited children: the argmax-Q and argmin-Q child and
    their Q gap. Children with fewer than ``min_visits`` visits are ignored. Returns ``best``,
    ``worst`` (``[B, N]`` int32, -1 where undefined) and ``gap`` (``[B, N]`` float64)."""
    bsz, cap = first_child.shape
    best = np.full((bsz, cap), -1, np.int32)
    worst = np.full((bsz, cap), -1, np.int32)
    gap = np.zeros((bsz, cap), np.float64)
    for b in range(bsz):
        for i in range(node_count[b]):
            k = num_children[b, i]
            if k < 2:
                continue
            hi = -np.inf
            lo = np.inf
            bi = -1
            wi = -1
            counted = 0
            for c in range(first_child[b, i], first_child[b, i] + k):
                n = visits[b, c]
                if n < min_visits or n == 0:
                    continue
                counted += 1
                q = value_sum[b, c] / n
                if q > hi:
                    hi = q
                    bi = c
                if q < lo:
                    lo = q
                    wi = c
            if counted >= 2 and bi != wi:
                best[b, i] = bi
                worst[b, i] = wi
                gap[b, i] = hi - lo
    return best, worst, gap
