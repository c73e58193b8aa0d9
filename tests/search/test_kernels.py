"""The numba kernels against plain-Python references on random trees."""

import math

import numpy as np
import pytest

from search import (
    PUCT,
    UCT,
    Tree,
    backup,
    backup_max,
    backup_visit_weighted,
    best_worst_children,
    puct_select,
    select_leaves,
    synthetic_search,
    visit_policy,
)
from search.kernels import CACHED_NODES


def random_tree(rng, batch=5, expansions=30, k_max=4):
    tree = Tree(batch, capacity=4)
    for b in range(batch):
        frontier = [0]
        for _ in range(expansions):
            node = frontier[int(rng.integers(len(frontier)))]
            if tree.num_children[b, node]:
                continue
            k = int(rng.integers(1, k_max + 1))
            pri = rng.dirichlet(np.ones(k))
            idx = tree.add_children(b, node, [f"s{j}\n" for j in range(k)], pri, np.zeros(k),
                                    rng.random(k) < 0.15)
            frontier.extend(i for i in idx if not tree.terminal[b, i])
        n = tree.node_count[b]
        tree.visits[b, :n] = rng.integers(0, 6, n)
        tree.value_sum[b, :n] = rng.random(n) * tree.visits[b, :n]
    return tree


def reference_select(tree, b, c_puct):
    node = 0
    while tree.num_children[b, node] > 0 and not tree.terminal[b, node]:
        explore = c_puct * math.sqrt(max(tree.visits[b, node], 1))
        scores = []
        for c in tree.children(b, node):
            n = tree.visits[b, c]
            q = tree.value_sum[b, c] / n if n else 0.0
            scores.append(q + explore * tree.prior[b, c] / (1 + n))  # the kernel's operation order
        node = tree.children(b, node)[int(np.argmax(scores))]
    return node


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("c_puct", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("large", [False, True])
def test_select_matches_reference(seed, c_puct, large):
    tree = random_tree(np.random.default_rng(seed))
    if large:  # rows past the cache-resident size take the other form of the PUCT walk
        tree._ensure_capacity(CACHED_NODES + 1)
    out = np.zeros(tree.batch_size, np.int32)
    puct_select(tree.first_child, tree.num_children, tree.visits, tree.value_sum, tree.prior,
                c_puct, out)
    assert out.tolist() == [reference_select(tree, b, c_puct) for b in range(tree.batch_size)]


def discounted_returns(tree, b, n, v, gamma):
    """(node, return) from node ``n`` up to the root, ``v`` the return of ``n``'s step: the node
    ``k`` steps above ``n`` gets the rewards of the steps from its own down, each discounted by its
    distance from it, plus ``v`` discounted by ``k`` (sum_i gamma^(k-i) r(p_i) + gamma^k v)."""
    path = []
    while n >= 0:
        path.append(int(n))
        n = tree.parent[b, n]
    return [(node, sum(tree.reward[b, path[i]] * gamma ** (k - i) for i in range(1, k + 1)) + v * gamma**k)
            for k, node in enumerate(path)]


def rewarded_tree_and_nodes(rng, count):
    """A random tree with a reward on about half of its steps, and ``count`` random (tree, node)
    pairs of it."""
    tree = random_tree(rng)
    tree.reward[:] = np.where(rng.random(tree.reward.shape) < 0.5, rng.random(tree.reward.shape), 0.0)
    tb = rng.integers(0, tree.batch_size, count).astype(np.int32)
    return tree, tb, np.array([rng.integers(0, tree.node_count[b]) for b in tb], np.int32)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_backup_matches_reference(seed, gamma):
    rng = np.random.default_rng(seed)
    tree, tb, nb = rewarded_tree_and_nodes(rng, 40)
    visits, value_sum = tree.visits.copy(), tree.value_sum.copy()
    vals = rng.random(40)
    backup(tree.parent, tree.visits, tree.value_sum, tree.reward, tb, nb, vals, gamma)
    for b, n, v in zip(tb, nb, vals):
        for node, ret in discounted_returns(tree, b, n, v, gamma):
            visits[b, node] += 1
            value_sum[b, node] += ret
    np.testing.assert_array_equal(tree.visits, visits)
    np.testing.assert_allclose(tree.value_sum, value_sum)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_max_backup_matches_reference(seed, gamma):
    rng = np.random.default_rng(seed)
    tree, tb, nb = rewarded_tree_and_nodes(rng, 60)
    best = {}  # (tree, node) -> the largest return backed up through it, as a plain maximum
    tree.visits[:], tree.value_sum[:] = 0, 0.0
    vals = rng.random(60) * 2 - 1
    for j in range(0, 60, 20):  # three kernel calls, each over a batch of backups
        backup_max(tree.parent, tree.visits, tree.value_sum, tree.reward, tb[j : j + 20], nb[j : j + 20],
                   vals[j : j + 20], gamma)
    counts = {}
    for b, n, v in zip(tb.tolist(), nb.tolist(), vals.tolist()):
        for node, ret in discounted_returns(tree, b, n, v, gamma):
            best[b, node] = max(best.get((b, node), -np.inf), ret)
            counts[b, node] = counts.get((b, node), 0) + 1
    for (b, n), v in best.items():
        assert tree.visits[b, n] == counts[b, n] and tree.q(b, n) == pytest.approx(v)
    assert int(tree.visits.sum()) == sum(counts.values())


@pytest.mark.parametrize("seed", range(5))
def test_best_worst_matches_reference(seed):
    tree = random_tree(np.random.default_rng(seed))
    best, worst, gap = best_worst_children(tree.first_child, tree.num_children, tree.visits,
                                           tree.value_sum, tree.node_count, 1)
    for b in range(tree.batch_size):
        for i in range(tree.node_count[b]):
            kids = [c for c in tree.children(b, i) if tree.visits[b, c] >= 1]
            qs = [tree.q(b, c) for c in kids]
            if len(kids) >= 2 and max(qs) > min(qs):
                assert best[b, i] == kids[int(np.argmax(qs))]
                assert worst[b, i] == kids[int(np.argmin(qs))]
                assert gap[b, i] == pytest.approx(max(qs) - min(qs))
            else:
                assert best[b, i] == -1 and worst[b, i] == -1


def test_tree_grows_by_doubling_and_keeps_data():
    tree = Tree(2, capacity=2)
    tree.add_children(0, 0, ["a\n", "b\n", "c\n"], [0.2, 0.3, 0.5], [0, 0, 1], [False, False, True])
    assert tree.capacity == 4
    tree.add_children(0, 1, ["d\n"] * 3, [1 / 3] * 3, [0] * 3, [False] * 3)
    assert tree.capacity == 8
    assert tree.prefix_text(0, 5) == "a\nd\n"
    assert tree.path(0, 5) == [1, 5] and tree.depth[0, 5] == 2
    assert tree.prior[0, 3] == 0.5 and tree.terminal[0, 3]
    assert tree.node_count.tolist() == [7, 1]
    with pytest.raises(ValueError, match="already expanded"):
        tree.add_children(0, 0, ["x\n"], [1.0], [0], [False])
    with pytest.raises(ValueError, match="is terminal"):  # selection relies on terminal => no children
        tree.add_children(0, 3, ["x\n"], [1.0], [0], [False])


def reference_select_general(tree, b, c, rule, normalize, start=0):
    lo = hi = 0.0
    if normalize:
        qs = [tree.value_sum[b, i] / tree.visits[b, i] for i in range(tree.node_count[b]) if tree.visits[b, i]]
        lo, hi = (min(qs), max(qs)) if qs else (0.0, 0.0)
    scale, shift = (1.0 / (hi - lo), lo) if hi > lo else (1.0, 0.0)
    node = start
    while tree.num_children[b, node] > 0 and not tree.terminal[b, node]:
        pn = tree.visits[b, node]
        scores = []
        for ch in tree.children(b, node):
            n = tree.visits[b, ch]
            q = (tree.value_sum[b, ch] / n - shift) * scale if n else 0.0
            if rule == PUCT:
                scores.append(q + c * math.sqrt(max(pn, 1)) * tree.prior[b, ch] / (1 + n))
            else:
                scores.append(q + c * math.sqrt(math.log(max(pn, 1)) / (1 + n)))  # Agent Q: unvisited too
        node = tree.children(b, node)[int(np.argmax(scores))]
    return node


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rule", [PUCT, UCT])
@pytest.mark.parametrize("normalize", [False, True])
def test_select_leaves_single_matches_reference(seed, rule, normalize):
    tree = random_tree(np.random.default_rng(seed))
    out = np.zeros((tree.batch_size, 1), np.int32)
    select_leaves(tree.parent, tree.first_child, tree.num_children, tree.visits, tree.value_sum, tree.prior,
                  tree.node_count, 1.3, rule, normalize, 1, np.zeros(tree.batch_size, np.int32), out)
    assert out[:, 0].tolist() == [reference_select_general(tree, b, 1.3, rule, normalize)
                                  for b in range(tree.batch_size)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("rule", "normalize", "large"), [(PUCT, False, False), (PUCT, False, True),
                                                          (PUCT, True, False), (UCT, False, False), (UCT, True, False)])
def test_select_leaves_from_committed_roots_matches_reference(seed, rule, normalize, large):
    rng = np.random.default_rng(100 + seed)
    tree = random_tree(rng)
    if large:  # the PUCT walk's form for rows past the cache-resident size
        tree._ensure_capacity(CACHED_NODES + 1)
    roots = np.array([rng.choice(np.flatnonzero(tree.num_children[b, : tree.node_count[b]] > 0))
                      for b in range(tree.batch_size)], np.int32)
    out = np.zeros((tree.batch_size, 1), np.int32)
    select_leaves(tree.parent, tree.first_child, tree.num_children, tree.visits, tree.value_sum, tree.prior,
                  tree.node_count, 1.3, rule, normalize, 1, roots, out)
    for b in range(tree.batch_size):
        assert out[b, 0] == reference_select_general(tree, b, 1.3, rule, normalize, start=int(roots[b]))
        assert int(roots[b]) in [0, *tree.path(b, int(out[b, 0]))]  # below the committed node


@pytest.mark.parametrize("normalize", [False, True])
def test_uct_is_agent_q_form_and_unvisited_child_need_not_win(normalize):
    # root N = 10; children A (N 5, W 4.0, Q 0.8), B (N 4, W 1.2, Q 0.3), C unvisited; c = 0.5.
    # Agent Q: Q + c * sqrt(ln N(p) / (1 + N(c))), ln 10 = 2.302585:
    #   A 0.8 + 0.5 * sqrt(2.302585 / 6) = 1.10974   (normalised Q over the tree, [0.3, 0.8] -> A 1.0: 1.30974)
    #   B 0.3 + 0.5 * sqrt(2.302585 / 5) = 0.63931   (normalised: B 0.0: 0.33931)
    #   C 0.0 + 0.5 * sqrt(2.302585 / 1) = 0.75871   (Q = 0 unvisited, normalised or not)
    # so A; the old UCB1 rule (unvisited first, c * sqrt(ln N(p) / N(c))) took C.
    tree = Tree(1, capacity=4)
    tree.add_children(0, 0, ["a\n", "b\n", "c\n"], [1 / 3] * 3, [0.0] * 3, [False] * 3)
    tree.visits[0, :4] = [10, 5, 4, 0]
    tree.value_sum[0, :4] = [5.2, 4.0, 1.2, 0.0]
    out = np.zeros((1, 1), np.int32)
    select_leaves(tree.parent, tree.first_child, tree.num_children, tree.visits, tree.value_sum, tree.prior,
                  tree.node_count, 0.5, UCT, normalize, 1, np.zeros(1, np.int32), out)
    assert out[0, 0] == 1
    assert reference_select_general(tree, 0, 0.5, UCT, normalize) == 1


@pytest.mark.parametrize("seed", range(6))
def test_virtual_loss_spreads_leaves_and_restores_visits(seed):
    tree = random_tree(np.random.default_rng(seed), expansions=60)
    before = tree.visits.copy()
    out = np.zeros((tree.batch_size, 4), np.int32)
    select_leaves(tree.parent, tree.first_child, tree.num_children, tree.visits, tree.value_sum, tree.prior,
                  tree.node_count, 1.0, PUCT, False, 3, np.zeros(tree.batch_size, np.int32), out)
    np.testing.assert_array_equal(tree.visits, before)
    for b in range(tree.batch_size):
        got = [x for x in out[b] if x >= 0]
        assert len(got) == len(set(got)) >= 1
        assert got[0] == reference_select_general(tree, b, 1.0, PUCT, False)
        # replay: the j-th descent sees the virtual visits of the earlier ones
        sim = tree.visits.copy()
        for j in range(4):
            saved = tree.visits
            tree.visits = sim
            leaf = reference_select_general(tree, b, 1.0, PUCT, False)
            tree.visits = saved
            assert out[b, j] in (leaf, -1)
            n = leaf
            while n >= 0:
                sim[b, n] += 3
                n = tree.parent[b, n]


def test_visit_weighted_backup_matches_formula():
    tree = Tree(1, capacity=8)
    tree.add_children(0, 0, ["a", "b"], [0.5, 0.5], [0.0, 0.0], [False, False])
    tree.add_children(0, 1, ["c", "d"], [0.5, 0.5], [0.2, 0.0], [False, False])
    tree.reward[0, 1] = 0.1
    tb = np.array([0, 0, 0], np.int32)
    backup_visit_weighted(tree.parent, tree.first_child, tree.num_children, tree.visits, tree.value_sum,
                          tree.reward, tb, np.array([3, 4, 2], np.int32), np.array([1.0, 0.0, 0.5]), 0.9)
    # node 1 after its children: r + gamma * (1*1 + 1*0) / 2 ; root: gamma * (N1 Q1 + N2 Q2) / (N1 + N2)
    q1 = 0.1 + 0.9 * (1.0 + 0.0) / 2
    assert tree.q(0, 1) == pytest.approx(q1) and tree.visits[0, 1] == 2
    assert tree.q(0, 2) == pytest.approx(0.5)
    assert tree.q(0, 0) == pytest.approx(0.9 * (2 * q1 + 1 * 0.5) / 3) and tree.visits[0, 0] == 3


def test_visit_policy_temperature():
    tree = Tree(1)
    tree.add_children(0, 0, ["a", "b", "c"], [1 / 3] * 3, [0] * 3, [False] * 3)
    tree.visits[0, 1:4] = [1, 3, 0]
    args = (tree.first_child, tree.num_children, tree.visits, 0, 0)
    np.testing.assert_allclose(visit_policy(*args, 1.0), [0.25, 0.75, 0.0])
    np.testing.assert_allclose(visit_policy(*args, 0.0), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(visit_policy(*args, 0.5), [0.1, 0.9, 0.0])


# Two capacities: rows that take the cache-resident (scan) form of PUCT selection and rows that
# take the latency-hiding (carry) form; both must make the reference's choices.
CAPACITIES = [None, CACHED_NODES + 1]


@pytest.mark.parametrize("capacity", CAPACITIES)
def test_synthetic_search_equals_python_reference(capacity):
    rng = np.random.default_rng(0)
    b, s, k = 3, 150, 4
    priors = rng.dirichlet(np.ones(k), size=(b, s))
    values = rng.random((b, s))
    tree = Tree(b, capacity=capacity or 1 + s * k)
    synthetic_search(tree.parent, tree.depth, tree.first_child, tree.num_children, tree.visits, tree.value_sum,
                     tree.prior, tree.reward, tree.terminal, tree.critic, tree.node_count, priors, values, 1.0, 6)
    ref = Tree(b, capacity=capacity or 1 + s * k)
    leaf = np.zeros(b, np.int32)
    for i in range(s):
        puct_select(ref.first_child, ref.num_children, ref.visits, ref.value_sum, ref.prior, 1.0, leaf)
        for t in range(b):
            if ref.depth[t, leaf[t]] < 6:
                ref.add_children(t, int(leaf[t]), ["x"] * k, priors[t, i], np.zeros(k), np.zeros(k, bool))
        backup(ref.parent, ref.visits, ref.value_sum, ref.reward, np.arange(b, dtype=np.int32), leaf, values[:, i], 1.0)
    np.testing.assert_array_equal(tree.visits, ref.visits)
    np.testing.assert_allclose(tree.value_sum, ref.value_sum)
    assert tree.depth.max() == 6
    first = tree.first_child[0, 0]
    assert tree.visits[0, first:first + k].tolist() == python_root_visits(priors[0], values[0], 1.0, 6)


def python_root_visits(priors, values, c_puct, max_depth):
    """The same search on plain nested lists (node = [visits, value_sum, prior, depth, children])."""
    root = [0, 0.0, 1.0, 0, []]
    for p, v in zip(priors, values):
        path = [root]
        while path[-1][4]:
            node = path[-1]
            explore = c_puct * math.sqrt(max(node[0], 1))
            path.append(max(node[4], key=lambda ch: (ch[1] / ch[0] if ch[0] else 0.0) + explore * ch[2] / (1 + ch[0])))
        if path[-1][3] < max_depth:
            path[-1][4] = [[0, 0.0, float(q), path[-1][3] + 1, []] for q in p]
        for node in path:
            node[0] += 1
            node[1] += v
    return [ch[0] for ch in root[4]]


def subtree_signature(tree, b, top):
    """Statistics of every node under ``top`` keyed by the step texts from ``top`` down to it."""
    out = {}
    for n in range(tree.node_count[b]):
        path = [0, *tree.path(b, n)]  # tree.path leaves the root out
        if top not in path:
            continue
        key = tuple(tree.texts[b][i] for i in path[path.index(top) + 1 :])
        prior = 1.0 if n == top else float(tree.prior[b, n])
        out[key] = (int(tree.visits[b, n]), float(tree.value_sum[b, n]), prior, bool(tree.terminal[b, n]),
                    int(tree.num_children[b, n]))
    return out


def test_reroot_keeps_statistics():
    tree = random_tree(np.random.default_rng(3), batch=2, expansions=40)
    b = 1
    child = next(c for c in tree.children(b, 0) if tree.num_children[b, c] > 0)
    before = subtree_signature(tree, b, child)
    committed_text = tree.prefix_text(b, child)
    other = (tree.visits[0].copy(), int(tree.node_count[0]))
    assert tree.reroot(b, child) == committed_text
    assert subtree_signature(tree, b, 0) == before and tree.node_count[b] == len(before)
    assert tree.parent[b, 0] == -1 and tree.depth[b, 0] == 0 and tree.texts[b][0] == ""
    for n in range(1, tree.node_count[b]):
        p = tree.parent[b, n]
        assert n in tree.children(b, p) and tree.depth[b, n] == tree.depth[b, p] + 1
    np.testing.assert_array_equal(tree.visits[0], other[0])  # other trees untouched
    assert tree.node_count[0] == other[1]


def test_reset_tree_searches_like_a_fresh_one():
    rng = np.random.default_rng(3)
    b, s, k = 4, 60, 3
    priors, values = rng.dirichlet(np.ones(k), size=(b, s)), rng.random((b, s))
    names = ("parent", "depth", "first_child", "num_children", "visits", "value_sum", "prior", "reward", "terminal",
             "critic")
    fresh = Tree(b, capacity=1 + s * k)
    used = random_tree(rng, batch=b, expansions=40)  # arbitrary leftovers, then emptied in place
    used.critic[:, :] = 0.5  # written directly, not through set_critic
    used._ensure_capacity(1 + s * k)
    used.reset(root_states=list("abcd"))
    assert used.node_count.tolist() == [1] * b and used.states == [[c] for c in "abcd"]
    for t in (fresh, used):
        synthetic_search(*(getattr(t, n) for n in names), t.node_count, priors, values, 1.0, 5)
    assert used.node_count.tolist() == fresh.node_count.tolist()
    for b_ in range(b):  # the slots in use are identical; the rest may hold stale values
        n_used = fresh.node_count[b_]
        for n in names:  # (NaN critic scores compare equal here)
            np.testing.assert_array_equal(getattr(used, n)[b_, :n_used], getattr(fresh, n)[b_, :n_used], err_msg=n)
    # add_children initialises every field of the slots it takes as well
    used.reset()
    kids = used.add_children(0, 0, ["x\n", "y\n"], [0.5, 0.5], [0.0, 1.0], [False, True])
    assert used.first_child[0, kids].tolist() == [-1, -1] and used.num_children[0, kids].tolist() == [0, 0]
    assert used.visits[0, kids].tolist() == [0, 0] and used.value_sum[0, kids].tolist() == [0.0, 0.0]
    assert used.terminal[0, kids].tolist() == [False, True] and used.depth[0, kids].tolist() == [1, 1]
