"""ToT (BFS, DFS), trajectory sampling and MCTS options on the math env with a scripted policy."""

import numpy as np
import pytest

from envs import MathEnv
from search import (
    Candidate,
    Tree,
    extract_pairs,
    extract_path_lists,
    extract_sibling_lists,
    extract_trajectories,
    mcts,
    sample_trajectories,
    tot_bfs,
    tot_dfs,
    tree_summary,
)

TASKS = [{"task_id": "a", "prompt": "(12+5)*3\n", "answer": "51"},
         {"task_id": "b", "prompt": "(7-2)*4\n", "answer": "20"}]
RIGHT = {"a": ["12+5=17\n", "17*3=51\n", "#### 51\n"], "b": ["7-2=5\n", "5*4=20\n", "#### 20\n"]}
WRONG = {"a": ["12+5=18\n", "17*3=41\n", "#### 50\n"], "b": ["7-2=6\n", "5*4=21\n", "#### 21\n"]}


def setup():
    env = MathEnv()
    roots = []
    for t in TASKS:
        env.reset(options={"task": t})
        roots.append(env.get_state())
    return env, Tree(len(TASKS), capacity=4, root_states=roots)


def step(env, state, text, logprob=-1.0):
    env.set_state(state)
    _, r, term, trunc, _ = env.step(text)
    return Candidate(text, logprob, 6, reward=r, terminal=term or trunc, state=env.get_state())


def expand_fn_for(env, offset=0):
    """The right and the wrong step at each node; ``offset``: steps committed before the root."""
    def expand_fn(tree, tb, nb):
        out = []
        for b, n in zip(tb, nb):
            d = min(int(tree.depth[b, n]) + offset, 2)
            tid = TASKS[b]["task_id"]
            out.append([step(env, tree.states[b][n], RIGHT[tid][d], -1.0),
                        step(env, tree.states[b][n], WRONG[tid][d], -2.0)])
        return out
    return expand_fn


def oracle(tree, tb, nb):
    return np.array([float(all(s in RIGHT[TASKS[b]["task_id"]] for s in
                               [tree.texts[b][i] for i in tree.path(b, n)])) for b, n in zip(tb, nb)])


def test_bfs_keeps_the_best_beam_and_reaches_the_answer():
    env, tree = setup()
    tot_bfs(tree, expand_fn=expand_fn_for(env), evaluate_fn=oracle, beam_width=1, max_depth=5)
    for b, t in enumerate(TASKS):
        trajs = extract_trajectories(tree, prompts=["p"] * 2, task_ids=["a", "b"])
        mine = [tr for tr in trajs if tr["task_id"] == t["task_id"]]
        assert any(tr["correct"] and tr["steps"] == RIGHT[t["task_id"]] for tr in mine)
        assert tree.node_count[b] == 1 + 2 * 3  # beam 1: one node expanded per level
    pairs = extract_pairs(tree, prompts=["p", "q"], task_ids=["a", "b"])
    assert len(pairs) == 6 and all(p["chosen"] in RIGHT[p["task_id"]] for p in pairs)


def test_dfs_prunes_low_values_and_stops_at_a_solution():
    env, tree = setup()
    tot_dfs(tree, expand_fn=expand_fn_for(env), evaluate_fn=oracle, max_expansions=10, prune_below=0.5)
    for b in range(2):
        assert tree.node_count[b] == 7  # root, then only the right child was explored at each level
        expanded = [i for i in range(tree.node_count[b]) if tree.num_children[b, i]]
        assert all(tree.texts[b][i] in RIGHT[TASKS[b]["task_id"]] + [""] for i in expanded)


def test_dfs_budget_is_respected():
    env, tree = setup()
    tot_dfs(tree, expand_fn=expand_fn_for(env), evaluate_fn=lambda t, tb, nb: np.ones(len(tb)),
            max_expansions=2, prune_below=0.0, stop_at_reward=None)
    assert all(int((tree.num_children[b] > 0).sum()) == 2 for b in range(2))


def test_sampling_builds_a_trie_with_monte_carlo_values():
    env, tree = setup()

    def sample_fn(t, tb, nb, k):
        out = []
        for b in tb:
            tid = TASKS[b]["task_id"]
            trajs = []
            for j in range(k):
                texts = RIGHT[tid] if j % 2 == 0 else RIGHT[tid][:1] + WRONG[tid][1:]
                state, traj = t.states[b][0], []
                for s in texts:
                    c = step(env, state, s)
                    traj.append(c)
                    state = c.state
                trajs.append(traj)
            out.append(trajs)
        return out

    sample_trajectories(tree, sample_fn=sample_fn, num_samples=4)
    for b in range(2):
        (first,) = tree.children(b, 0)  # all four share the first step
        assert tree.visits[b, first] == 4 and tree.q(b, first) == pytest.approx(0.5)
        assert tree.node_count[b] == 1 + 1 + 2 + 2
    pairs = extract_pairs(tree, prompts=["p", "q"], task_ids=["a", "b"])
    assert [p["prefix"] for p in pairs] == [RIGHT["a"][0], RIGHT["b"][0]]
    lists = extract_path_lists(tree, prompts=["p", "q"], task_ids=["a", "b"])
    assert lists[0]["scores"] == [1.0, 0.0] and lists[0]["responses"][0] == "".join(RIGHT["a"])


@pytest.mark.parametrize("kwargs", [dict(rule="uct"), dict(backup_mode="visit-weighted", gamma=0.9),
                                    dict(backup_mode="max"),
                                    dict(leaves_per_tree=3), dict(normalize_q=True), dict()])
def test_mcts_options_find_the_solution(kwargs):
    env, tree = setup()
    mcts(tree, expand_fn=expand_fn_for(env), evaluate_fn=oracle, num_simulations=10, **kwargs)
    for b, t in enumerate(TASKS):
        best = max(tree.children(b, 0), key=lambda c, b=b: tree.q(b, c))
        assert tree.texts[b][best] == RIGHT[t["task_id"]][0]
    assert tree_summary(tree)["pair_yield"] > 0.5


def test_mcts_outcome_only_backs_up_terminal_rewards():
    env, tree = setup()
    mcts(tree, expand_fn=expand_fn_for(env), evaluate_fn=None, num_simulations=6)
    for b in range(2):
        assert tree.visits[b, 0] >= 1
        open_nodes = [i for i in range(1, tree.node_count[b]) if not tree.terminal[b, i]]
        # an open node is only ever visited through a terminal below it
        for i in open_nodes:
            below = [j for j in range(tree.node_count[b]) if i in tree.path(b, j) and tree.terminal[b, j]]
            assert tree.visits[b, i] == 0 or below


def test_all_pairs_mode_lists_and_smoothing():
    env, tree = setup()
    mcts(tree, expand_fn=expand_fn_for(env), evaluate_fn=oracle, num_simulations=8)
    best = extract_pairs(tree, prompts=["p", "q"], task_ids=["a", "b"])
    every = extract_pairs(tree, prompts=["p", "q"], task_ids=["a", "b"], mode="all", min_q_gap=0.0,
                          visit_smoothing=True)
    assert len(every) >= len(best)
    for p in every:
        nw, nl = p["chosen_visits"], p["rejected_visits"]
        assert p["label_smoothing"] == pytest.approx(min(nl / (nw + nl), 0.5))
        assert p["chosen_q"] >= p["rejected_q"]
    lists = extract_sibling_lists(tree, prompts=["p", "q"], task_ids=["a", "b"])
    assert lists and all(ls["scores"] == sorted(ls["scores"], reverse=True) for ls in lists)
    with pytest.raises(ValueError):
        extract_pairs(tree, prompts=["p", "q"], task_ids=["a", "b"], mode="bogus")


def test_mcts_commits_step_by_step_and_keeps_the_committed_siblings():
    env, early = setup()
    mcts(early, expand_fn=expand_fn_for(env), evaluate_fn=oracle, num_simulations=2, c_puct=4.0)
    env, plain = setup()
    mcts(plain, expand_fn=expand_fn_for(env), evaluate_fn=oracle, num_simulations=12, c_puct=4.0)
    env, tree = setup()
    mcts(tree, expand_fn=expand_fn_for(env), evaluate_fn=oracle, num_simulations=12, c_puct=4.0, commit_every=2)
    for b, t in enumerate(TASKS):
        node, chain = 0, []
        while tree.num_children[b, node]:  # the committed steps: the most visited child, level by level
            kids = tree.children(b, node)
            node = kids[int(np.argmax(tree.visits[b, kids.start : kids.stop]))]
            chain.append(tree.texts[b][node])
        assert chain == RIGHT[t["task_id"]] and tree.terminal[b, node]
        # the first step's rejected sibling keeps the statistics it had when the step was committed
        (wrong,) = [c for c in tree.children(b, 0) if tree.texts[b][c] != RIGHT[t["task_id"]][0]]
        assert early.texts[b][wrong] == tree.texts[b][wrong]
        assert (tree.visits[b, wrong], tree.value_sum[b, wrong]) == (early.visits[b, wrong], early.value_sum[b, wrong])
        assert plain.visits[b, wrong] > early.visits[b, wrong]  # without commits the search went back to it
        assert tree.visits[b, 0] < plain.visits[b, 0]  # it stopped once it had committed to the last step
    pairs = extract_pairs(tree, prompts=["p", "q"], task_ids=["a", "b"])
    assert sorted(p["prefix"] for p in pairs if p["task_id"] == "a") == ["", "12+5=17\n", "12+5=17\n17*3=51\n"]
    with pytest.raises(ValueError, match="commit_every"):
        mcts(tree, expand_fn=expand_fn_for(env), evaluate_fn=oracle, num_simulations=1, commit_every=-1)


def test_mcts_goes_on_after_reroot_with_the_kept_statistics():
    env, tree = setup()
    mcts(tree, expand_fn=expand_fn_for(env), evaluate_fn=oracle, num_simulations=4)
    kept = {}
    for b, t in enumerate(TASKS):
        right = next(c for c in tree.children(b, 0) if tree.texts[b][c] == RIGHT[t["task_id"]][0])
        kept[b] = (int(tree.visits[b, right]), float(tree.value_sum[b, right]))
        assert tree.reroot(b, right) == RIGHT[t["task_id"]][0]
        assert (tree.visits[b, 0], tree.value_sum[b, 0]) == kept[b]
    # reroot counts depths from the committed step: the expansions start one step in
    mcts(tree, expand_fn=expand_fn_for(env, offset=1), evaluate_fn=oracle, num_simulations=4)
    for b in range(2):
        assert tree.visits[b, 0] > kept[b][0]
        best = max(tree.children(b, 0), key=lambda c, b=b: tree.q(b, c))
        assert tree.texts[b][best] == RIGHT[TASKS[b]["task_id"]][1]


def test_commits_need_a_visited_child_and_break_ties_by_prior():
    from search.mcts import _commit

    tree = Tree(3)
    for b in range(3):
        tree.add_children(b, 0, ["a\n", "b\n"], [0.3, 0.7], [0.0, 1.0], [False, b == 2])
    tree.visits[1, 1:3] = [2, 2]  # tied visits: the higher prior ('b') is committed
    tree.visits[2, 1:3] = [1, 3]  # 'b' is terminal: committed, and the tree stops
    roots, stopped = np.zeros(3, np.int32), np.zeros(3, np.bool_)
    _commit(tree, roots, stopped, max_depth=5)
    assert roots.tolist() == [0, 2, 2] and stopped.tolist() == [False, False, True]  # tree 0: no visits yet
    _commit(tree, roots, stopped, max_depth=1)  # tree 1's root 'b' is at the depth limit
    assert roots.tolist() == [0, 2, 2] and stopped.tolist() == [False, True, True]
