"""numba kernels over the arrays of :class:`search.tree.Tree`.

Each kernel handles the whole batch of trees in one call: a call from Python costs about a
microsecond, so per-simulation calls would dominate the cost of the arithmetic itself.

Selection rules (``rule``):
    PUCT (AlphaZero; MCTS-DPO eq. 1):  Q(c) + c_puct * P(c) * sqrt(N(p)) / (1 + N(c))
    UCT  (Agent Q, Putta et al., 2024, Sec. 4.2):  Q(c) + c_puct * sqrt(ln N(p) / (1 + N(c)))
Q is ``W / N`` (0 for unvisited children) and, with ``normalize_q``, min–max normalised over the
visited nodes of its tree (MuZero Appendix B; mctx's ``qtransform_by_min_max``); an unvisited
child keeps Q = 0 either way. N(p) counts as at least 1. Ties go to the lowest index.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uintp

__all__ = [
    "PUCT",
    "UCT",
    "backup",
    "backup_max",
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


# Trees with up to this many node slots (about 28 bytes of statistics each) stay in a core's L2
# cache, and selection takes the scan form; larger ones take the form that hides memory latency.
CACHED_NODES = 1 << 15


@njit(cache=True, inline="always")
def _descend_puct(fc, nc, vis, ws, pr, c, path, scores, root):
    """The PUCT walk on raw Q from the root to a leaf (a node without children), always taking the
    best-scoring child (from node ``root``: 0, or where a committed search goes on); the nodes
    passed (root first) go to ``path`` while it has room. Returns the
    number of steps taken, so the leaf is ``path[steps]`` when ``steps < len(path)``. Takes one
    tree's rows (1-D views) and ``scores``, with room for the most children of any node.

    Terminal nodes never have children (:meth:`Tree.add_children` refuses them), so the walk reads
    no ``terminal`` flags; and W is 0 while N is 0, so ``W / max(N, 1)`` is the Q of unvisited
    children too, without a branch. Indices are unsigned (``uintp``), which spares numba's
    negative-index wraparound in the innermost loops.

    Both forms compute the same scores and make the same choices; which is faster depends on
    whether the rows fit in cache. A loop that calls one of them many times should call that form
    directly (see :func:`synthetic_search`): with both inlined in one loop, the compiled loop is
    slower than either."""
    if fc.shape[0] <= CACHED_NODES:
        return _descend_puct_scan(fc, nc, vis, ws, pr, c, path, scores, root)
    return _descend_puct_carry(fc, nc, vis, ws, pr, c, path, root)


@njit(cache=True, inline="always")
def _descend_puct_scan(fc, nc, vis, ws, pr, c, path, scores, root):
    """:func:`_descend_puct` for trees in cache: each level first scores all children (a loop
    without dependences between iterations) and then takes the argmax (first on ties)."""
    cap = path.shape[0]
    path[0] = root
    steps = 0
    node = uintp(root)
    while nc[node] > 0:
        first = uintp(fc[node])
        k = nc[node]
        explore = c * math.sqrt(max(vis[node], 1))
        for i in range(k):
            n = float(vis[first + i])
            scores[i] = ws[first + i] / max(n, 1.0) + explore * pr[first + i] / (1.0 + n)
        best = 0
        best_score = scores[0]
        for i in range(1, k):
            if scores[i] > best_score:
                best_score = scores[i]
                best = i
        node = first + uintp(best)
        steps += 1
        if steps < cap:
            path[steps] = node
    return steps


@njit(cache=True, inline="always")
def _descend_puct_carry(fc, nc, vis, ws, pr, c, path, root):
    """:func:`_descend_puct` for trees larger than the cache. Scanning the children also loads
    each child's own ``first_child``, ``num_children`` and ``visits``, and the best child's are
    carried to the next level: those loads, cache misses in a large tree, then overlap with the
    scan instead of adding a second dependent memory access per level."""
    cap = path.shape[0]
    path[0] = root
    steps = 0
    first = uintp(fc[root])
    k = nc[root]
    parent_n = vis[root]
    while k > 0:
        explore = c * math.sqrt(max(parent_n, 1))  # once per node, not once per child
        best = first
        best_score = -np.inf
        best_fc, best_k, best_n = uintp(0), 0, 0
        ch = first
        last = first + uintp(k)
        while ch < last:
            n = vis[ch]
            ch_fc, ch_k = fc[ch], nc[ch]
            score = ws[ch] / max(n, 1) + explore * pr[ch] / (1.0 + n)
            if score > best_score:
                best_score = score
                best, best_fc, best_k, best_n = ch, uintp(ch_fc), ch_k, n
            ch += uintp(1)
        first, k, parent_n = best_fc, best_k, best_n
        steps += 1
        if steps < cap:
            path[steps] = best
    return steps


@njit(cache=True, inline="always")
def _descend(fc, nc, vis, ws, pr, c, rule, lo, hi, path, scores, root):
    """:func:`_descend_puct` for any rule, with Q min-max rescaled to [0, 1] when ``hi > lo``."""
    if rule == PUCT and not hi > lo:  # the common case: PUCT on raw Q, no per-child rescaling
        return _descend_puct(fc, nc, vis, ws, pr, c, path, scores, root)
    cap = path.shape[0]
    path[0] = root
    steps = 0
    scale = 1.0 / (hi - lo) if hi > lo else 1.0
    shift = lo if hi > lo else 0.0
    node = uintp(root)
    while nc[node] > 0:
        first = uintp(fc[node])
        parent_n = max(vis[node], 1)
        explore = c * math.sqrt(parent_n) if rule == PUCT else 0.0
        log_n = math.log(parent_n) if rule == UCT else 0.0  # >= 0
        best = first
        best_score = -np.inf
        ch = first
        last = first + uintp(nc[node])
        while ch < last:
            n = vis[ch]
            if n > 0:
                q = (ws[ch] / n - shift) * scale
                score = q + explore * pr[ch] / (1.0 + n) if rule == PUCT else q + c * math.sqrt(log_n / (1.0 + n))
            else:  # Q = 0
                score = explore * pr[ch] if rule == PUCT else c * math.sqrt(log_n)
            if score > best_score:
                best_score = score
                best = ch
            ch += uintp(1)
        node = best
        steps += 1
        if steps < cap:
            path[steps] = node
    return steps


@njit(cache=True, inline="always")
def _descend_into(fc, nc, vis, ws, pr, c, rule, lo, hi, path, scores, root):
    """:func:`_descend`, retried with a larger ``path`` when the first did not have room for every
    level. Returns ``(steps, path)``; the leaf is ``path[steps]``."""
    steps = _descend(fc, nc, vis, ws, pr, c, rule, lo, hi, path, scores, root)
    if steps >= path.shape[0]:
        path = np.empty(2 * steps + 2, np.int64)
        steps = _descend(fc, nc, vis, ws, pr, c, rule, lo, hi, path, scores, root)
    return steps, path


@njit(cache=True)
def puct_select(first_child, num_children, visits, value_sum, prior, c_puct, out_leaf):
    """One PUCT leaf per tree, raw Q (ties go to the lowest index). Arrays ``[B, N]``; ``out_leaf``
    ``[B]`` int32."""
    path = np.empty(64, np.int64)
    scores = np.empty(max(num_children.max(), 1))
    for b in range(first_child.shape[0]):
        steps, path = _descend_into(first_child[b], num_children[b], visits[b], value_sum[b], prior[b],
                                    c_puct, PUCT, 0.0, 0.0, path, scores, 0)
        out_leaf[b] = path[steps]


@njit(cache=True)
def select_leaves(parent, first_child, num_children, visits, value_sum, prior, node_count,
                  c, rule, normalize_q, virtual_loss, roots, out_leaf):
    """Up to ``L = out_leaf.shape[1]`` distinct leaves per tree in one call, each tree's descents
    starting at its node ``roots[b]`` (``[B]`` int32: 0, or the step a search has committed to).

    After each descent a *virtual loss* is applied along the path (``virtual_loss`` extra visits
    with value 0), so the next descent in the same tree is steered elsewhere (Chaslot et al., 2008;
    AlphaGo's parallel search). Virtual visits are removed before returning. A leaf reached twice
    is reported once; unused slots hold -1. ``out_leaf`` is ``[B, L]`` int32.
    """
    bsz, num = out_leaf.shape
    reached = np.empty(num, np.int64)
    path = np.empty(64, np.int64)
    scores = np.empty(max(num_children.max(), 1))
    for b in range(bsz):
        lo, hi = 0.0, 0.0
        if normalize_q:
            lo, hi = _q_range(b, visits, value_sum, node_count)
        for j in range(num):
            steps, path = _descend_into(first_child[b], num_children[b], visits[b], value_sum[b], prior[b],
                                        c, rule, lo, hi, path, scores, roots[b])
            leaf = path[steps]
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
def backup(parent, visits, value_sum, reward, tree_index, node_index, values, gamma):
    """Back ``values[j]``, the return of step ``node_index[j]`` of tree ``tree_index[j]`` (its own
    reward and what follows it), up to the root: each node on the way adds the return from its own
    step on, ``G(parent) = reward[parent] + gamma * G(child)``, to its value sum and counts one more
    visit (running-mean backup, Q = W / N, as mctx's). With no reward but at the end and
    ``gamma = 1`` every node adds ``values[j]`` itself."""
    for j in range(tree_index.shape[0]):
        b = tree_index[j]
        node = node_index[j]
        v = values[j]
        while True:
            visits[b, node] += 1
            value_sum[b, node] += v
            node = parent[b, node]
            if node < 0:
                break
            v = reward[b, node] + gamma * v


@njit(cache=True)
def backup_max(parent, visits, value_sum, reward, tree_index, node_index, values, gamma):
    """Max backup (llm-reasoners' ``calc_q=np.max``): node ``node_index[j]`` of tree ``tree_index[j]``
    and each of its ancestors keep the largest return backed up through them (returns as in
    :func:`backup`, ``values[j]`` the step's own), and their visit counts grow by one. Stored as
    ``W = Q * N`` so that ``Q = W / N`` reads the same as for :func:`backup` (the visits must be
    real ones: no virtual loss pending)."""
    for j in range(tree_index.shape[0]):
        b = tree_index[j]
        node = node_index[j]
        v = values[j]
        while True:
            n = visits[b, node]
            q = value_sum[b, node] / n if n > 0 else v
            if v > q:
                q = v
            visits[b, node] = n + 1
            value_sum[b, node] = q * (n + 1)
            node = parent[b, node]
            if node < 0:
                break
            v = reward[b, node] + gamma * v


@njit(cache=True)
def backup_visit_weighted(parent, first_child, num_children, visits, value_sum, reward, tree_index,
                          node_index, values, gamma):
    """MCTS-DPO's backup (Xie et al., 2024, eqs. 3–4): node ``node_index[j]`` adds ``values[j]``, the
    return of its step (its own reward and what follows it, ``r + gamma * V``); every ancestor's
    value becomes ``r + gamma * sum_c N(c) Q(c) / sum_c N(c)`` over its children (the
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
def synthetic_search(parent, depth, first_child, num_children, visits, value_sum, prior, reward, terminal,
                     critic, node_count, priors, values, c_puct, max_depth):
    """Whole searches inside one call, for benchmarks and tests: ``S`` sequential PUCT simulations
    on each of ``B`` fresh trees. Simulation ``s`` of tree ``b`` selects a leaf, expands it (when
    above ``max_depth``) with ``K`` children whose priors are ``priors[b, s]``, and backs up
    ``values[b, s]`` from the leaf. ``priors`` is ``[B, S, K]``, ``values`` ``[B, S]``; the tree
    arrays need ``1 + S * K`` slots per tree. No node is terminal. Returns the number of node
    updates made by backup.

    The backup walks the path recorded during selection rather than the parent links, whose cache
    lines the descent never touched."""
    if first_child.shape[1] <= CACHED_NODES:  # one loop per form: see _descend_puct
        return _synthetic(parent, depth, first_child, num_children, visits, value_sum, prior, reward, terminal,
                          critic, node_count, priors, values, c_puct, max_depth, True)
    return _synthetic(parent, depth, first_child, num_children, visits, value_sum, prior, reward, terminal,
                      critic, node_count, priors, values, c_puct, max_depth, False)


@njit(cache=True, inline="always")
def _synthetic(parent, depth, first_child, num_children, visits, value_sum, prior, reward, terminal,
               critic, node_count, priors, values, c_puct, max_depth, scan):
    bsz, sims, k = priors.shape
    updates = 0
    path = np.empty(max_depth + 1, np.int64)  # room for every level: leaves are at most max_depth deep
    scores = np.empty(k)
    for b in range(bsz):
        par, dep, fc, nc = parent[b], depth[b], first_child[b], num_children[b]
        vis, ws, pr, rew, term, crit = visits[b], value_sum[b], prior[b], reward[b], terminal[b], critic[b]
        for s in range(sims):
            if scan:
                steps = _descend_puct_scan(fc, nc, vis, ws, pr, c_puct, path, scores, 0)  # = the leaf's depth
            else:
                steps = _descend_puct_carry(fc, nc, vis, ws, pr, c_puct, path, 0)
            leaf = path[steps]
            if steps < max_depth:
                start = node_count[b]
                for i in range(k):  # every field: the slots may hold stale values after Tree.reset
                    par[start + i] = leaf
                    dep[start + i] = steps + 1
                    pr[start + i] = priors[b, s, i]
                    fc[start + i] = -1
                    nc[start + i] = 0
                    vis[start + i] = 0
                    ws[start + i] = 0.0
                    rew[start + i] = 0.0
                    term[start + i] = False
                    crit[start + i] = np.nan
                fc[leaf] = start
                nc[leaf] = k
                node_count[b] = start + k
            v = values[b, s]
            for j in range(steps + 1):
                node = uintp(path[j])
                vis[node] += 1
                ws[node] += v
            updates += steps + 1
    return updates
