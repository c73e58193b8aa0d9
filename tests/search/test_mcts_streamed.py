"""Asynchronous MCTS (search.mcts_streamed) against the round-by-round MCTS, with scripted
expansions that depend only on the node's path."""

import zlib

import numpy as np
import pytest

from search import Candidate, Tree, mcts, mcts_streamed

STEPS = ["a\n", "b\n", "c\n", "d\n", "end\n"]


def expansions(t, b, n):
    """A node's candidates and their values, the same whenever it is expanded: drawn from a
    generator seeded by its tree and path. Some repeat a text, some end the episode, some nodes
    get none (a dead end)."""
    path = t.prefix_text(b, n)
    rng = np.random.default_rng(zlib.crc32(f"{b}|{path}".encode()))
    if rng.random() < 0.08:
        return [], np.zeros(0)
    cands = []
    for _ in range(int(rng.integers(1, 5))):
        text = STEPS[int(rng.integers(len(STEPS)))]
        terminal = text == "end\n"
        cands.append(Candidate(text, logprob=float(-rng.random() * 5), num_tokens=int(rng.integers(1, 6)),
                               reward=float(terminal and rng.random() < 0.5), terminal=terminal))
    return cands, rng.random(len(cands))


def lockstep(batch, sims, **kw):
    tree = Tree(batch, capacity=8)
    values = {}

    def expand_fn(t, tb, nb):
        out = []
        for b, n in zip(tb.tolist(), nb.tolist()):
            cands, vals = expansions(t, b, n)
            for c, v in zip(cands, vals):
                values.setdefault((b, t.prefix_text(b, n) + c.text), v)
            out.append(cands)
        return out

    def evaluate_fn(t, tb, nb):
        return np.array([values[(b, t.prefix_text(b, n))] for b, n in zip(tb.tolist(), nb.tolist())])

    return mcts(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, num_simulations=sims, **kw)


class Scrambled:
    """start_fn / wait_fn that hand expansions back in a random order, a random number at a time."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.going = []
        self.started = []

    def start(self, t, b, n):
        self.going.append((b, n))
        self.started.append((b, n, sum(1 for x, _ in self.going if x == b)))

    def wait(self, t):
        k = int(self.rng.integers(1, len(self.going) + 1))
        picked = sorted(self.rng.choice(len(self.going), size=k, replace=False).tolist(), reverse=True)
        out = []
        for i in picked:
            b, n = self.going.pop(i)
            out.append((b, n, *expansions(t, b, n)))
        return out


@pytest.mark.parametrize("kw", [{}, {"backup_mode": "visit-weighted"}, {"backup_mode": "max"},
                                {"rule": "uct", "max_depth": 3}, {"commit_every": 2},
                                {"commit_every": 3, "backup_mode": "visit-weighted", "gamma": 0.9}])
def test_one_in_flight_equals_round_by_round_mcts(kw):
    batch, sims = 6, 25
    ref = lockstep(batch, sims, **kw)
    for seed in range(3):
        driver = Scrambled(seed)
        tree = mcts_streamed(Tree(batch, capacity=8), start_fn=driver.start, wait_fn=driver.wait,
                             num_simulations=sims, **kw)
        assert tree.node_count.tolist() == ref.node_count.tolist()
        for name in ("parent", "visits", "prior", "terminal", "reward"):
            np.testing.assert_array_equal(getattr(tree, name), getattr(ref, name), err_msg=name)
        # the same values, added up in another order (terminal children first there)
        np.testing.assert_allclose(tree.value_sum, ref.value_sum, rtol=1e-12, atol=1e-12)
        assert tree.texts == ref.texts
    assert ref.node_count.sum() > 50 and ref.terminal.any()  # the trees grew and have ends to revisit


def test_several_in_flight_keep_their_bounds_and_leave_no_virtual_visits():
    batch, sims = 4, 30
    driver = Scrambled(7)
    backed = np.zeros(batch, np.int64)  # visits the backups add at each root

    def wait(t):
        out = driver.wait(t)
        for b, _node, cands, _values in out:
            texts = {c.text for c in cands}
            backed[b] += max(len(texts), 1)
        return out

    def progress(done, total):
        calls.append((done, total))

    calls = []
    tree = mcts_streamed(Tree(batch, capacity=8), start_fn=driver.start, wait_fn=wait, num_simulations=sims,
                         in_flight=3, progress=progress)
    most = max(k for _, _, k in driver.started)
    assert most == 3  # three expansions of one tree were going at once, never more
    started = np.bincount([b for b, _, _ in driver.started], minlength=batch)
    assert (started <= sims).all()
    # each root's visits are exactly what was backed up: each expansion's children (or its dead
    # end), and one for each simulation that expanded nothing (a repeat visit of an end); the
    # virtual visits are all gone
    assert (tree.visits[:, 0] == backed + (sims - started)).all()
    assert (sims - started).sum() > 0
    keys = [(b, n) for b, n, _ in driver.started]
    for b in range(batch):  # a node is expanded once
        mine = [n for x, n in keys if x == b]
        assert len(mine) == len(set(mine))
    assert calls and calls[-1] == (sims, sims) and [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("mode", ["visit-weighted", "max"])
def test_several_in_flight_back_up_real_visits(mode):
    """With other expansions of a tree in flight (their paths holding virtual visits), the backups
    that store W = Q * N still give every node the Q of its form: visit-weighted, r + the
    visit-weighted mean of its children's Q; max, the largest value backed up through it."""
    driver = Scrambled(11)
    tree = mcts_streamed(Tree(4, capacity=8), start_fn=driver.start, wait_fn=driver.wait, num_simulations=30,
                         in_flight=3, backup_mode=mode)
    assert max(k for _, _, k in driver.started) == 3
    checked = 0
    for b in range(tree.batch_size):
        for i in range(tree.node_count[b]):
            kids = [c for c in tree.children(b, i) if tree.visits[b, c]]
            if not kids:
                continue
            if mode == "visit-weighted":
                n = sum(int(tree.visits[b, c]) for c in kids)
                expected = tree.reward[b, i] + sum(tree.value_sum[b, c] for c in kids) / n
                assert tree.q(b, i) == pytest.approx(expected)
            else:  # at least its children's best, and one of the values that came through it
                assert tree.q(b, i) >= max(tree.q(b, c) for c in kids) - 1e-12
            checked += 1
    assert checked > 20


def test_bad_driver_and_arguments():
    with pytest.raises(RuntimeError, match="wait_fn returned nothing"):
        mcts_streamed(Tree(1), start_fn=lambda t, b, n: None, wait_fn=lambda t: [], num_simulations=2)
    with pytest.raises(ValueError, match="was not started"):
        mcts_streamed(Tree(1), start_fn=lambda t, b, n: None, wait_fn=lambda t: [(0, 5, [], np.zeros(0))],
                      num_simulations=2)
    with pytest.raises(ValueError, match="in_flight"):
        mcts_streamed(Tree(1), start_fn=None, wait_fn=None, num_simulations=2, in_flight=0)


@pytest.mark.parametrize("seed", range(8))
def test_step_commits_with_several_in_flight(seed):
    """MCTS-DPO's step commits while several expansions of a tree are going: trees that commit to
    their last step stop early, no virtual visit is left behind (each root holds what was backed up
    through it, plus at most one visit per simulation that expanded nothing), and progress reports
    all done only once nothing is going."""
    batch, sims = 6, 40
    driver = Scrambled(seed)
    backed = np.zeros(batch, np.int64)
    reported = []

    def wait(t):
        assert sims not in reported
        out = driver.wait(t)
        for b, _node, cands, _values in out:
            backed[b] += max(len({c.text for c in cands}), 1)
        return out

    tree = mcts_streamed(Tree(batch, capacity=8), start_fn=driver.start, wait_fn=wait, num_simulations=sims,
                         in_flight=3, commit_every=2, max_depth=4, progress=lambda done, total: reported.append(done))
    assert reported[-1] == sims and reported == sorted(reported)
    expansions = np.bincount([b for b, _, _ in driver.started], minlength=batch)
    assert max(k for _, _, k in driver.started) > 1  # commits happened with other expansions going
    repeats = tree.visits[:, 0] - backed  # simulations that expanded nothing (each backs one visit up)
    assert (repeats >= 0).all() and (expansions + repeats <= sims).all()
    assert (expansions + repeats < sims).any()  # stopped early, at an end or at the depth limit
    for b in range(batch):
        for i in range(1, tree.node_count[b]):  # real counts only: a parent has its children's visits
            assert tree.visits[b, tree.parent[b, i]] >= tree.visits[b, i] >= 0


def test_an_error_from_a_plug_in_leaves_no_virtual_visits():
    def wait(t):
        raise RuntimeError("the server went away")

    tree = Tree(3, capacity=8)
    with pytest.raises(RuntimeError, match="went away"):
        mcts_streamed(tree, start_fn=lambda t, b, n: None, wait_fn=wait, num_simulations=5, in_flight=3)
    assert not tree.visits.any()  # the roots' expansions were going, holding a virtual visit each
    with pytest.raises(ValueError, match="backup mode"):  # refused before any expansion starts
        mcts_streamed(tree, start_fn=None, wait_fn=None, num_simulations=5, backup_mode="median")
