"""MCTS, extraction and export with a scripted policy on the math env."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from envs import MathEnv
from search import (
    Candidate,
    Tree,
    back_up,
    extract_pairs,
    extract_trajectories,
    mcts,
    mcts_streamed,
    merge_candidates,
    to_networkx,
    tree_from_dict,
    tree_to_dict,
)

GOLDEN = Path(__file__).with_name("golden_mcts_tree.json")
TASK = {"task_id": "t0", "prompt": "(12+5)*3\n", "answer": "51", "level": 2}


def scripted(tree, env):
    """Candidates: the right next line, a wrong one and a repeat of the right one."""
    def expand_fn(t, tb, nb):
        out = []
        for b, n in zip(tb, nb):
            depth = int(t.depth[b, n])
            options = [["12+5=17\n", "12+5=18\n", "12+5=17\n"], ["17*3=51\n", "17*3=41\n"],
                       ["#### 51\n", "#### 50\n"]][min(depth, 2)]
            cands = []
            for j, text in enumerate(options):
                env.set_state(t.states[b][n])
                _, r, term, trunc, _ = env.step(text)
                cands.append(Candidate(text, logprob=-1.0 - j, num_tokens=8, reward=r, terminal=term or trunc,
                                       state=env.get_state()))
            out.append(cands)
        return out

    def evaluate_fn(t, tb, nb):  # an honest oracle: is the prefix still on the right track?
        return np.array([float("18" not in t.prefix_text(b, n) and "41" not in t.prefix_text(b, n))
                         for b, n in zip(tb, nb)])

    return expand_fn, evaluate_fn


def run_search(sims=12):
    env = MathEnv()
    env.reset(options={"task": TASK})
    tree = Tree(1, capacity=4, root_states=[env.get_state()])
    expand_fn, evaluate_fn = scripted(tree, env)
    return mcts(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, num_simulations=sims, c_puct=1.0)


def test_mcts_finds_the_correct_path_and_dedupes():
    tree = run_search()
    root_kids = list(tree.children(0, 0))
    assert [tree.texts[0][i] for i in root_kids] == ["12+5=17\n", "12+5=18\n"]  # repeat merged
    assert tree.q(0, root_kids[0]) > tree.q(0, root_kids[1])
    trajs = extract_trajectories(tree, prompts=[TASK["prompt"]], task_ids=["t0"])
    good = [t for t in trajs if t["correct"]]
    assert good and good[0]["steps"] == ["12+5=17\n", "17*3=51\n", "#### 51\n"]


def test_pairs_prefer_correct_steps():
    tree = run_search()
    pairs = extract_pairs(tree, prompts=[TASK["prompt"]], task_ids=["t0"], iteration=3, min_q_gap=0.5)
    assert pairs, "a search that found right and wrong steps must yield pairs"
    keys = {"prompt", "prefix", "chosen", "rejected", "chosen_q", "rejected_q", "chosen_visits",
            "rejected_visits", "task_id", "node_id", "iteration"}
    for p in pairs:
        assert set(p) == keys and p["iteration"] == 3
        assert p["chosen_q"] - p["rejected_q"] >= 0.5
        assert p["chosen"] in {"12+5=17\n", "17*3=51\n", "#### 51\n"}
    root_pair = next(p for p in pairs if p["prefix"] == "")
    assert (root_pair["chosen"], root_pair["rejected"]) == ("12+5=17\n", "12+5=18\n")


def test_golden_tree():
    """A seeded, scripted search is fully deterministic; its tree is stored as JSON."""
    data = tree_to_dict(run_search(), 0)
    if os.environ.get("UPDATE_GOLDEN"):  # regenerate deliberately, then review the diff
        GOLDEN.write_text(json.dumps(data, indent=1))
    assert data == json.loads(GOLDEN.read_text())


def test_export_round_trip_and_networkx():
    tree = run_search()
    data = tree_to_dict(tree, 0, meta={"task_id": "t0"})
    again = tree_to_dict(tree_from_dict(json.loads(json.dumps(data))), 0, meta={"task_id": "t0"})
    assert again == data
    g = to_networkx(tree, 0)
    assert g.number_of_nodes() == tree.node_count[0] and g.number_of_edges() == tree.node_count[0] - 1
    assert g.nodes[1]["text"] == "12+5=17\n" and g.nodes[1]["visits"] == tree.visits[0, 1]


def test_merge_candidates_priors():
    kept, pri = merge_candidates([Candidate("a", -2.0, 2), Candidate("b", -4.0, 2), Candidate("a", -2.0, 2)])
    assert [c.text for c in kept] == ["a", "b"]
    assert pri == pytest.approx(np.exp([-1, -2]) / np.exp([-1, -2]).sum())


@pytest.mark.parametrize("mode", ["mean", "visit-weighted"])
def test_back_up_skips_pending_values_and_takes_them_later(mode):
    """A NaN value is pending: nothing moves; backing the value up later gives the statistics that
    backing it up at once gives."""
    def grown():
        tree = Tree(1)
        tree.add_children(0, 0, ["a\n", "b\n"], np.array([0.5, 0.5]), [0.0, 0.0], [False, False], [None, None])
        tree.add_children(0, 1, ["c\n"], np.array([1.0]), [0.0], [False], [None])
        return tree

    now, later = grown(), grown()
    back_up(now, [0, 0, 0], [1, 2, 3], [0.25, 1.0, 0.5], mode=mode)
    back_up(later, [0, 0, 0], [1, 2, 3], [0.25, 1.0, float("nan")], mode=mode)
    assert later.visits[0, 3] == 0 and later.visits[0, 0] == 2
    back_up(later, [0], [3], [0.5], mode=mode)
    np.testing.assert_array_equal(now.visits, later.visits)
    if mode == "mean":  # (the visit-weighted form reads the children as they stand at each backup)
        np.testing.assert_allclose(now.value_sum, later.value_sum)


def test_a_leaf_whose_value_is_pending_is_not_valued_by_a_repeat_visit():
    """A child valued late (``evaluate_fn`` gives NaN; its value is backed up during the next
    expansion call) and selected again at ``max_depth`` meanwhile backs up nothing, not its empty
    Q as a 0: Q along the path is what valuing it at once gives (fewer visits: the repeat visits
    while it was pending carried no value)."""
    def run(late_values):
        tree = Tree(1, capacity=8, root_states=[None])
        late = []

        def expand_fn(t, tb, nb):
            for b, n, v in late:  # a rollout that went on ends during the next expansion call
                back_up(t, [b], [n], [v])
            late.clear()
            return [[Candidate("a\n", logprob=-1.0, num_tokens=2, reward=0.0, terminal=False, state=None)]
                    for _ in tb]

        def evaluate_fn(t, tb, nb):
            if not late_values:
                return np.ones(len(tb))
            late.extend((int(b), int(n), 1.0) for b, n in zip(tb, nb))
            return np.full(len(tb), np.nan)

        mcts(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, num_simulations=3, max_depth=1, rule="uct")
        for b, n, v in late:
            back_up(tree, [b], [n], [v])
        return tree.value_sum[0, :2] / tree.visits[0, :2]

    np.testing.assert_array_equal(run(late_values=True), run(late_values=False))  # 1.0 each (0.33 before)


def test_bad_arguments():
    tree = Tree(1)
    with pytest.raises(ValueError):
        mcts(tree, expand_fn=None, evaluate_fn=None, num_simulations=-1)
    with pytest.raises(ValueError):
        mcts(tree, expand_fn=None, evaluate_fn=None, num_simulations=1, c_puct=float("nan"))
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            mcts(tree, expand_fn=None, evaluate_fn=None, num_simulations=1, gamma=gamma)
        with pytest.raises(ValueError, match="gamma"):
            mcts_streamed(tree, start_fn=None, wait_fn=None, num_simulations=1, gamma=gamma)


def test_search_imports_without_torch():
    code = "import sys, search; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_never_valued_node_at_the_depth_limit_backs_up_its_own_reward():
    """Outcome-only values, depth limit 1: the root's children are never valued by an evaluation,
    and a repeat visit backs up what the return of their step is known to be, their reward."""
    tree = mcts(Tree(1, capacity=4), expand_fn=lambda t, tb, nb: [[Candidate("x\n", -1.0, 1, reward=0.5)] for _ in tb],
                evaluate_fn=None, num_simulations=3, max_depth=1)
    assert tree.visits[0, 1] == 2 and tree.q(0, 1) == pytest.approx(0.5) and tree.q(0, 0) == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["mean", "visit-weighted", "max"])
def test_step_rewards_and_discount_make_each_q_the_return_of_its_step(mode):
    """With a reward on every step and gamma < 1, a node's Q is the return from its step on: its
    own reward plus gamma times what follows. A new open leaf holds r + gamma * v (v: evaluate_fn's
    value of what follows), a terminal one r; an ancestor adds its reward to each return coming up
    (mean: W(n) = own returns + sum_c (N(c) r(n) + gamma W(c))); visit-weighted,
    Q(n) = r(n) + gamma * (visit-weighted mean of its children's Q); max, at least
    r(n) + gamma * Q of its best child."""
    gamma, v = 0.8, 0.5

    def expand_fn(t, tb, nb):  # two steps a node, rewards 0.1 and 0.3; depth 4 ends the episode with 1 or 0
        out = []
        for b, n in zip(tb, nb):
            d = int(t.depth[b, n]) + 1
            out.append([Candidate(f"{d}{s}\n", -1.0 - j, 2, reward=(1.0 - j) if d == 4 else r, terminal=d == 4)
                        for j, (s, r) in enumerate((("a", 0.1), ("b", 0.3)))])
        return out

    tree = mcts(Tree(1, capacity=4), expand_fn=expand_fn, evaluate_fn=lambda t, tb, nb: np.full(len(tb), v),
                num_simulations=10, backup_mode=mode, gamma=gamma, c_puct=2.0)
    checked = {"leaf": 0, "terminal": 0, "inner": 0}
    for i in range(tree.node_count[0]):
        kids = [c for c in tree.children(0, i) if tree.visits[0, c]]
        r, q = tree.reward[0, i], tree.q(0, i)
        if not tree.num_children[0, i] and tree.visits[0, i] == 1:
            kind = "terminal" if tree.terminal[0, i] else "leaf"
            assert q == pytest.approx(r if tree.terminal[0, i] else r + gamma * v)
            checked[kind] += 1
        elif kids and i:
            own = (r + gamma * v) if mode != "max" else None  # valued once when it was made, then through its children
            if mode == "mean":
                expected_w = own + sum(tree.visits[0, c] * r + gamma * tree.value_sum[0, c] for c in kids)
                assert tree.value_sum[0, i] == pytest.approx(expected_w)
            elif mode == "visit-weighted":
                n = sum(int(tree.visits[0, c]) for c in kids)
                assert q == pytest.approx(r + gamma * sum(tree.value_sum[0, c] for c in kids) / n)
            else:
                assert q >= r + gamma * max(tree.q(0, c) for c in kids) - 1e-12
            checked["inner"] += 1
    assert min(checked.values()) > 0, checked
