"""The numba kernels against plain-Python references on random trees."""

import math

import numpy as np
import pytest

from search import Tree, backup, best_worst_children, puct_select


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
        sqrt_n = math.sqrt(max(tree.visits[b, node], 1))
        scores = []
        for c in tree.children(b, node):
            n = tree.visits[b, c]
            q = tree.value_sum[b, c] / n if n else 0.0
            scores.append(q + c_puct * tree.prior[b, c] * sqrt_n / (1 + n))
        node = tree.children(b, node)[int(np.argmax(scores))]
    return node


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("c_puct", [0.0, 0.5, 2.0])
def test_select_matches_reference(seed, c_puct):
    tree = random_tree(np.random.default_rng(seed))
    out = np.zeros(tree.batch_size, np.int32)
    puct_select(tree.first_child, tree.num_children, tree.visits, tree.value_sum, tree.prior,
                tree.terminal, c_puct, out)
    assert out.tolist() == [reference_select(tree, b, c_puct) for b in range(tree.batch_size)]


@pytest.mark.parametrize("seed", range(5))
def test_backup_matches_reference(seed):
    rng = np.random.default_rng(seed)
    tree = random_tree(rng)
    visits, value_sum = tree.visits.copy(), tree.value_sum.copy()
    tb = rng.integers(0, tree.batch_size, 40).astype(np.int32)
    nb = np.array([rng.integers(0, tree.node_count[b]) for b in tb], np.int32)
    vals = rng.random(40)
    backup(tree.parent, tree.visits, tree.value_sum, tb, nb, vals)
    for b, n, v in zip(tb, nb, vals):
        while n >= 0:
            visits[b, n] += 1
            value_sum[b, n] += v
            n = tree.parent[b, n]
    np.testing.assert_array_equal(tree.visits, visits)
    np.testing.assert_allclose(tree.value_sum, value_sum)


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
