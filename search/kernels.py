"""numba kernels over the arrays of :class:`search.tree.Tree`.

Each kernel handles the whole batch of trees in one call: a call from Python costs about a
microsecond, so per-simulation calls would dominate the cost of the arithmetic itself.

Selection rules (``rule``):
    PUCT (AlphaZero; MCTS-DPO eq. 1):  Q(c) + c_puct * P(c) * sqrt(N(p)) / (1 + N(c))
    UCT  (UCB1, as Agent Q uses it):    Q(c) + c_puct * sqrt(ln N(p) / N(c)),  unvisited first
Q is ``W / N`` (0 for unvisited children) and, with ``normalize_q``, min–max normalised over the
visited nodes of its tree (MuZero Appendix B; mctx's ``qtransform_by_min_max``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = [
    "PUCT",
    "UCT",
    "backup",
    "backup_visit_weighted",
    "best_worst_children",
    "puct_select",
    "select_leaves",
    "synthetic_search",
    "visit_policy",
]

PUCT = 0
UCT = 1


@njit(cache=True)
def _q_range(b, visits, value_sum, node_count):
    lo = np.inf
    hi = -np.inf
    for i in range(node_count[b]):
        n = visits[b, i]
        if n > 0:
            q = value_sum[b, i] / n
            lo = min(lo, q)
            hi = max(hi, q)
    return lo, hi


@njit(cache=True, inline="always")
def _descend(fc, nc, vis, ws, pr, term, c, rule, lo, hi):
    """The leaf reached from the root by always taking the best-scoring child. Takes one tree's
    rows (1-D views): indexing a row is cheaper than ``[b, i]`` in the innermost loop."""
    node = 0
    if rule == PUCT and not hi > lo:  # the common case: PUCT on raw Q, no per-child rescaling
        while nc[node] > 0 and not term[node]:
            first = fc[node]
            # the parent's term is computed once per node, not once per child
            explore = c * math.sqrt(max(vis[node], 1))
            best = first
            best_score = -np.inf
            for ch in range(first, first + nc[node]):
                n = vis[ch]
                score = ws[ch] / n + explore * pr[ch] / (1.0 + n) if n > 0 else explore * pr[ch]
                if score > best_score:
                    best_score = score
                    best = ch
            node = best
        return node
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    shift = lo if hi > lo else 0.0
    while nc[node] > 0 and not term[node]:
        first = fc[node]
        parent_n = max(vis[node], 1)
        explore = c * math.sqrt(parent_n) if rule == PUCT else c * math.sqrt(math.log(parent_n))
        best = first
        best_score = -np.inf
        for ch in range(first, first + nc[node]):
            n = vis[ch]
            if n > 0:
                q = (ws[ch] / n - shift) * scale
                score = q + explore * pr[ch] / (1.0 + n) if rule == PUCT else q + explore / math.sqrt(n)
            else:
                score = explore * pr[ch] if rule == PUCT else np.inf
            if score > best_score:
                best_score = score
                best = ch
        node = best
    return node


@njit(cache=True)
def puct_select(first_child, num_children, visits, value_sum, prior, terminal, c_puct, out_leaf):
    """One PUCT leaf per tree, raw Q (ties go to the lowest index). Arrays ``[B, N]``; ``out_leaf``
    ``[B]`` int32."""
    for b in range(first_child.shape[0]):
        out_leaf[b] = _descend(first_child[b], num_children[b], visits[b], value_sum[b], prior[b], terminal[b],
                               c_puct, PUCT, 0.0, 0.0)


@njit(cache=True)
def select_leaves(parent, first_child, num_children, visits, value_sum, prior, terminal, node_count,
                  c, rule, normalize_q, virtual_loss, out_leaf):
    """Up to ``L = out_leaf.shape[1]`` distinct leaves per tree in one call.

    After each descent a *virtual loss* is applied along the path (``virtual_loss`` extra visits
    with value 0), so the next descent in the same tree is steered elsewhere (Chaslot et al., 2008;
    AlphaGo's parallel search). Virtual visits are removed before returning. A leaf reached twice
    is reported once; unused slots hold -1. ``out_leaf`` is ``[B, L]`` int32.
    """
    bsz, num = out_leaf.shape
    reached = np.empty(num, np.int64)
    for b in range(bsz):
        lo, hi = 0.0, 0.0
        if normalize_q:
            lo, hi = _q_range(b, visits, value_sum, node_count)
        for j in range(num):
            leaf = _descend(first_child[b], num_children[b], visits[b], value_sum[b], prior[b], terminal[b], c,
                            rule, lo, hi)
            reached[j] = leaf
            out_leaf[b, j] = leaf
            for k in range(j):
                if out_leaf[b, k] == leaf:
                    out_leaf[b, j] = -1
            node = leaf
            while node >= 0:
                visits[b, node] += virtual_loss
                node = parent[b, node]
        for j in range(num):  # undo: value_sum was never touched, a virtual visit is worth 0
            node = reached[j]
            while node >= 0:
                visits[b, node] -= virtual_loss
                node = parent[b, node]


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
def backup_visit_weighted(parent, first_child, num_children, visits, value_sum, reward, tree_index,
                          node_index, values, gamma):
    """MCTS-DPO's backup (Xie et al., 2024, eqs. 3–4): the new node gets value ``v``; every
    ancestor's value becomes ``r + gamma * sum_c N(c) Q(c) / sum_c N(c)`` over its children (the
    visit-weighted mean), and its visit count grows by one. Stored as ``W = Q * N`` so that
    ``Q = W / N`` reads the same as for :func:`backup`."""
    for j in range(tree_index.shape[0]):
        b = tree_index[j]
        node = node_index[j]
        visits[b, node] += 1
        value_sum[b, node] += values[j]
        node = parent[b, node]
        while node >= 0:
            visits[b, node] += 1
            num = 0.0
            den = 0.0
            first = first_child[b, node]
            for ch in range(first, first + num_children[b, node]):
                n = visits[b, ch]
                if n > 0:
                    num += value_sum[b, ch]
                    den += n
            q = reward[b, node] + gamma * (num / den if den > 0 else 0.0)
            value_sum[b, node] = q * visits[b, node]
            node = parent[b, node]


@njit(cache=True)
def visit_policy(first_child, num_children, visits, b, node, temperature):
    """The visit-count distribution over a node's children, ``N(c)^(1/T) / sum``; ``T = 0`` puts all
    mass on the most visited child (first on ties). Returns ``[num_children]`` float64."""
    k = num_children[b, node]
    out = np.zeros(k)
    if k == 0:
        return out
    first = first_child[b, node]
    if temperature <= 0:
        best = 0
        for i in range(k):
            if visits[b, first + i] > visits[b, first + best]:
                best = i
        out[best] = 1.0
        return out
    m = 0
    for i in range(k):
        m = max(m, visits[b, first + i])
    if m == 0:
        out[:] = 1.0 / k
        return out
    for i in range(k):
        out[i] = (visits[b, first + i] / m) ** (1.0 / temperature)
    return out / out.sum()


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


@njit(cache=True)
def synthetic_search(parent, depth, first_child, num_children, visits, value_sum, prior, terminal,
                     node_count, priors, values, c_puct, max_depth):
    """Whole searches inside one call, for benchmarks and tests: ``S`` sequential PUCT simulations
    on each of ``B`` trees. Simulation ``s`` of tree ``b`` selects a leaf, expands it (when above
    ``max_depth``) with ``K`` children whose priors are ``priors[b, s]``, and backs up
    ``values[b, s]`` from the leaf. ``priors`` is ``[B, S, K]``, ``values`` ``[B, S]``; the tree
    arrays need ``1 + S * K`` slots per tree. Returns the number of node updates made by backup."""
    bsz, sims, k = priors.shape
    updates = 0
    for b in range(bsz):
        par, dep, fc, nc = parent[b], depth[b], first_child[b], num_children[b]
        vis, ws, pr, term = visits[b], value_sum[b], prior[b], terminal[b]
        for s in range(sims):
            leaf = _descend(fc, nc, vis, ws, pr, term, c_puct, PUCT, 0.0, 0.0)
            if dep[leaf] < max_depth and not term[leaf]:
                start = node_count[b]
                for i in range(k):
                    par[start + i] = leaf
                    dep[start + i] = dep[leaf] + 1
                    pr[start + i] = priors[b, s, i]
                fc[leaf] = start
                nc[leaf] = k
                node_count[b] = start + k
            v = values[b, s]
            node = leaf
            while node >= 0:
                vis[node] += 1
                ws[node] += v
                node = par[node]
                updates += 1
    return updates
