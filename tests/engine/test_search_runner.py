"""Every search algorithm and leaf evaluation, run with a real (briefly trained) tiny model."""

import dataclasses
import sys
from itertools import islice

import numpy as np
import pytest
import torch

from engine import search_runner
from engine.config import TrainConfig
from engine.run_inputs import load_policy
from engine.search_runner import play_out, rollout_trajectories, run_search
from envs import MathEnv, arithmetic_tasks
from search import Tree, extract_pairs, tree_summary

TASKS = [t for _, t in zip(range(4), arithmetic_tasks(5, levels=(2,)))]


@pytest.fixture(scope="module")
def policy(trained_model_dir, device):
    return load_policy(trained_model_dir, str(device))


@pytest.mark.parametrize(
    ("search", "leaf_eval"),
    [("mcts", "rollout"), ("mcts", "outcome"), ("mcts", "self-eval"), ("mcts", "mix"), ("tot-bfs", "rollout"),
     ("tot-dfs", "self-eval"), ("sample", "rollout"), ("sample", "mix"), ("mcts-commit", "rollout")],
)
def test_each_algorithm_builds_consistent_trees(policy, search, leaf_eval):
    commit = 1 if search == "mcts-commit" else 0  # MCTS-DPO's step-by-step search
    cfg = dataclasses.replace(TrainConfig(), search=search.removesuffix("-commit"), leaf_eval=leaf_eval,
                              simulations=3, num_candidates=3, max_new_tokens=40, step_max_tokens=16, max_depth=6,
                              prune_below=0.0, commit_every=commit, normalize_q=bool(commit))
    torch.manual_seed(0)
    record = []
    tree = run_search(policy, MathEnv(max_steps=6), TASKS, cfg, rollout_record=record)
    summary = tree_summary(tree)
    assert summary["trees"] == 4 and summary["nodes"] > 4
    for b in range(tree.batch_size):
        n = tree.node_count[b]
        for i in range(1, n):  # statistics are consistent: a parent has at least its children's visits
            assert tree.visits[b, tree.parent[b, i]] >= tree.visits[b, i]
            assert tree.texts[b][i].endswith("\n") and tree.texts[b][i].count("\n") == 1
        kids = [tree.texts[b][i] for i in tree.children(b, 0)]
        assert len(kids) == len(set(kids))  # identical siblings merged
        q = tree.value_sum[b, :n] / np.maximum(tree.visits[b, :n], 1)
        assert ((q >= -1e-9) & (q <= 1 + 1e-9)).all()
    if leaf_eval == "mix":  # the policy's self-evaluation scored every step as the critic, terminal ones too
        steps = [(b, i) for b in range(tree.batch_size) for i in range(1, tree.node_count[b])]
        critic = np.array([tree.critic[b, i] for b, i in steps])
        assert steps and ((critic > 0) & (critic < 1)).all()
        assert np.isnan(tree.critic[:, 0]).all()  # the roots are no step
    if commit:  # one search root per simulation, each below the last: the expanded nodes form one path
        for b in range(tree.batch_size):
            expanded = [i for i in range(tree.node_count[b]) if tree.num_children[b, i]]
            assert len({int(tree.depth[b, i]) for i in expanded}) == len(expanded)
            assert all(tree.parent[b, i] in expanded for i in expanded if i)
    if leaf_eval == "rollout" and search != "sample":
        assert record and all(len(r) == 4 for r in record)
        trajs = rollout_trajectories(tree, record, prompts=[t["prompt"] for t in TASKS],
                                     task_ids=[t["task_id"] for t in TASKS], iteration=1)
        assert all(t["source"] == "rollout" for t in trajs)
    extract_pairs(tree, prompts=[t["prompt"] for t in TASKS], task_ids=[t["task_id"] for t in TASKS])


def test_discounted_search_values_each_step_by_its_discounted_return(policy, tmp_path):
    """--gamma 0.5, each open node valued 1 by a scorer (math rewards only the last step): a
    terminal step's Q is its reward, and each other node's value sum is what was backed up at it
    (0.5 * 1) plus 0.5 times its children's value sums."""
    (tmp_path / "one.py").write_text("def score(prompts, partials):\n    return [1.0] * len(partials)\n")
    cfg = dataclasses.replace(TrainConfig(), gamma=0.5, leaf_eval="scorer", scorer=f"{tmp_path / 'one.py'}:score",
                              simulations=6, num_candidates=3, max_new_tokens=40, step_max_tokens=16, max_depth=6)
    torch.manual_seed(0)
    tree = run_search(policy, MathEnv(max_steps=6), TASKS, cfg)
    inner = 0
    for b in range(tree.batch_size):
        for i in range(1, tree.node_count[b]):
            if tree.terminal[b, i]:
                assert tree.q(b, i) in (0.0, 1.0) or not tree.visits[b, i]
                continue
            kids = tree.children(b, i)
            own = tree.value_sum[b, i] - 0.5 * sum(tree.value_sum[b, c] for c in kids)
            assert own == pytest.approx(0.5)  # its own value, discounted: 0.5 * 1
            inner += len(kids) > 0
    assert inner > 0


def test_play_out_scores_a_reference_solution():
    env = MathEnv()
    task = TASKS[0]
    env.reset(options={"task": task})
    reward, steps, total = play_out(env, env.get_state(), task["solution"] + "junk after the end\n")
    assert reward == total == 1.0 and "".join(steps) == task["solution"]
    env.reset(options={"task": task})
    assert play_out(env, env.get_state(), "1+1=3\n")[0] == 0.0


class CountingEnv:
    """A reward of 0.25 for each line, and 1 more for the line "end", which ends the episode."""

    def reset(self, *, seed=None, options=None):
        self.lines = 0
        return "", {}

    def set_state(self, state):
        self.lines = state

    def get_state(self):
        return self.lines

    def step(self, line):
        self.lines += 1
        done = line.strip() == "end"
        return "", 0.25 + float(done), done, False, {}


def test_rollouts_are_valued_and_recorded_by_their_return():
    value, steps, total = play_out(CountingEnv(), 0, "a\nb\nend\nafter\n")
    assert value == total == 1.75 and steps == ["a\n", "b\n", "end\n"]
    # discounted: each reward counts gamma**k, k its step's distance from the rollout's start
    assert play_out(CountingEnv(), 0, "a\nb\nend\n", gamma=0.5) == (0.25 + 0.5 * 0.25 + 0.25 * 1.25, steps, 1.75)
    tree = Tree(1, root_states=[0])
    (kid,) = tree.add_children(0, 0, ["s\n"], [1.0], [0.25], [False], [1])
    (rec,) = rollout_trajectories(tree, [(0, int(kid), steps, value)], prompts=["p"], task_ids=["t"], iteration=1)
    assert rec["steps"] == ["s\n", *steps] and rec["reward"] == 2.0  # the tree path's step rewards, then the rollout's


def test_discounted_rollouts_value_each_child_by_its_discounted_return(policy):
    """--gamma 0.5 with rollout values, in an environment that rewards every line: a child valued
    once by its rollout has Q = its step's reward + 0.5 * the rollout's discounted return."""
    cfg = dataclasses.replace(TrainConfig(), gamma=0.5, simulations=2, num_candidates=3, max_new_tokens=40,
                              step_max_tokens=16, max_depth=6)
    record = []
    torch.manual_seed(0)
    tree = run_search(policy, CountingEnv(), TASKS, cfg, rollout_record=record)
    checked = 0
    for b, n, steps, total in record:
        assert total == 0.25 * len(steps) + ("end\n" in steps)  # records keep the undiscounted return
        if tree.visits[b, n] == 1 and not tree.num_children[b, n]:
            rollout = sum(0.5**k * 0.25 for k in range(len(steps)))
            assert tree.q(b, n) == pytest.approx(0.25 + 0.5 * rollout)
            checked += any(steps)
    assert checked > 0


class RecordingPolicy:
    """The real policy, with every generate call and sample kept."""

    def __init__(self, policy):
        self.policy, self.calls = policy, []

    def generate(self, prompts, **kw):
        out = self.policy.generate(prompts, **kw)
        self.calls.append((kw, [(p, s.text) for p, group in zip(prompts, out) for s in group]))
        return out

    def logprobs(self, *a, **kw):
        return self.policy.logprobs(*a, **kw)

    def prefix_cache(self, *a, **kw):
        return self.policy.prefix_cache(*a, **kw)


def rollout_lines(text, k):
    """The first ``k`` non-blank lines of ``text``, each ending in a newline (as rollouts record them)."""
    return [line + "\n" for line in text.split("\n") if line.strip()][:k]


@pytest.mark.parametrize("rollouts", [1, 2])
def test_rollouts_continue_the_samples_that_proposed_the_steps(policy, rollouts):
    cfg = dataclasses.replace(TrainConfig(), simulations=3, num_candidates=3, rollouts=rollouts, max_new_tokens=40,
                              step_max_tokens=16, max_depth=6, park_rows=0)  # each round waits for its rollouts
    rec, record = RecordingPolicy(policy), []
    torch.manual_seed(0)
    tree = run_search(rec, MathEnv(max_steps=6), TASKS, cfg, rollout_record=record)
    # one call per simulation proposes the steps and runs on to the end of the solution; only the
    # rollouts beyond the first per child need calls of their own
    expansions = [kw for kw, _ in rec.calls if kw.get("head_stop") == "\n"]
    assert len(expansions) == cfg.simulations and all(kw["stop"] is None for kw in expansions)
    assert len(rec.calls) == cfg.simulations * (1 if rollouts == 1 else 2)
    sampled = {(p, text) for kw, rows in rec.calls if kw.get("head_stop") for p, text in rows}
    prompts = [t["prompt"] for t in TASKS]
    per_node: dict = {}
    for b, n, steps, _ in record:
        per_node[(b, n)] = per_node.get((b, n), 0) + 1
        context = prompts[b] + tree.prefix_text(b, int(tree.parent[b, n]))
        if per_node[(b, n)] == 1:  # the first rollout is the rest of a sample whose first line is the step
            step = tree.texts[b][n]  # a sample that ended within its first line gave the step a newline
            assert any(text.startswith(step) and rollout_lines(text[len(step):], len(steps)) == steps
                       or text + "\n" == step and not steps for p, text in sampled if p == context)
    assert per_node and set(per_node.values()) == {rollouts}


def test_parked_rollouts_go_on_in_the_next_round_and_value_their_nodes(policy):
    """Rollouts still running when an expansion call returns go on as rows of the next round's call
    (and of one last call after the search); every child is valued once, by its own rollout."""
    tasks = list(islice(arithmetic_tasks(11), 32))
    cfg = dataclasses.replace(TrainConfig(), tasks_per_iteration=32, simulations=4, num_candidates=3, park_rows=24,
                              max_new_tokens=48, temperature=2.0)  # the test model's lines end sooner
    rec, record = RecordingPolicy(policy), []
    parked, made = [], []
    original = search_runner.ParkedRollouts.finish

    def finish(self, tree, going, samples):
        made.append(self)
        parked.extend((p.context, p.tokens_left, s[0].text, s[0].parked) for p, s in zip(going, samples))
        return original(self, tree, going, samples)

    search_runner.ParkedRollouts.finish = finish
    try:
        torch.manual_seed(0)
        tree = run_search(rec, MathEnv(max_steps=cfg.max_depth), tasks, cfg, rollout_record=record)
    finally:
        search_runner.ParkedRollouts.finish = original
    expansions = [kw for kw, _ in rec.calls if kw.get("head_stop") == "\n"]
    assert len(expansions) == cfg.simulations and all(kw["park"] == 24 for kw in expansions)
    assert parked and made[0].parked == made[0].finished > 0 and not made[0].waiting  # every one ended
    went_on = [kw for kw in expansions[1:] if np.ndim(kw["num_samples"]) == 1 and min(kw["num_samples"]) == 1]
    assert went_on or "head_stop" not in rec.calls[-1][0]  # as rows of a later expansion call, or in a last call
    assert all("park" not in kw for kw, _ in rec.calls if kw.get("head_stop") is None)  # the others park nothing
    # each parked rollout went on from its whole context, within what was left of its token cap
    for _, left, text, _ in parked:
        assert 0 < left < cfg.max_new_tokens and len(policy.tokenizer(text)["input_ids"]) <= left
    # every child is valued once, by one rollout: the open ones, and those whose expansion later
    # found nothing (marked terminal then); and visits add up to the root
    valued = [(b, n) for b, n, _, _ in record]
    open_children = {(b, i) for b in range(tree.batch_size) for i in range(1, tree.node_count[b])
                     if not tree.terminal[b, i]}
    assert len(valued) == len(set(valued)) and set(valued) >= open_children
    assert all(tree.terminal[b, n] and tree.num_children[b, n] == 0 for b, n in set(valued) - open_children)
    for b in range(tree.batch_size):
        n = tree.node_count[b]
        assert (tree.visits[b, 1:n] >= 1).all()
        assert tree.visits[b, 0] >= tree.visits[b, tree.children(b, 0)].sum()


PRM = '''
def score(prompts, partials):
    """A stand-in process reward model: longer partial solutions score higher."""
    assert len(prompts) == len(partials) and all(isinstance(p, str) for p in prompts + partials)
    return [min(len(p), 40) / 40 for p in partials]
'''


def _prm(partial: str) -> float:
    return min(len(partial), 40) / 40


@pytest.mark.parametrize("leaf_eval", ["scorer", "mix"])
def test_external_scorer_values_leaves_or_scores_them_as_critic(policy, tmp_path, leaf_eval):
    (tmp_path / "prm.py").write_text(PRM)
    cfg = dataclasses.replace(TrainConfig(), leaf_eval=leaf_eval, scorer=f"{tmp_path / 'prm.py'}:score",
                              simulations=3, num_candidates=3, max_new_tokens=40, step_max_tokens=16, max_depth=6)
    torch.manual_seed(0)  # (two steps at most: the second ends every episode, so the trees have terminal steps)
    tree = run_search(policy, MathEnv(max_steps=2), TASKS, cfg)
    fresh = scored = 0
    for b in range(tree.batch_size):
        for i in range(1, tree.node_count[b]):
            prefix = tree.prefix_text(b, i)
            leaf = not tree.terminal[b, i] and not tree.num_children[b, i]
            if leaf_eval == "scorer" and leaf and tree.visits[b, i] == 1:
                assert tree.q(b, i) == pytest.approx(_prm(prefix))  # valued once, by the scorer
                fresh += 1
            if leaf_eval == "mix":
                assert tree.critic[b, i] == pytest.approx(_prm(prefix))  # every step scored by the critic
                q = tree.q(b, i)
                assert q == pytest.approx(round(q * tree.visits[b, i]) / max(tree.visits[b, i], 1))  # rollout rewards
                scored += int(tree.terminal[b, i])
    assert (fresh if leaf_eval == "scorer" else scored) > 0
    assert np.isnan(tree.critic).all() == (leaf_eval == "scorer")
    prompts, ids = [t["prompt"] for t in TASKS], [t["task_id"] for t in TASKS]
    if leaf_eval == "mix":
        for p in extract_pairs(tree, prompts=prompts, task_ids=ids, min_q_gap=0.0, alpha=0.5):
            assert p["chosen_score"] >= p["rejected_score"]


def test_scorer_errors_name_the_problem(tmp_path, monkeypatch):
    from engine.errors import UsageError
    from engine.scorers import load_scorer, make_scorer_fn

    for spec, needle in [("prm", "give MODULE:FUNCTION"), (f"{tmp_path}/none.py:score", "no such file"),
                         ("json:nope", "json has no function nope"),
                         ("no_such_module_x:f", "importing no_such_module_x")]:
        with pytest.raises(UsageError, match=needle):
            load_scorer(spec)
    (tmp_path / "broken_prm.py").write_text("raise RuntimeError('weights missing')\n")
    with pytest.raises(UsageError, match="weights missing"):
        load_scorer(f"{tmp_path / 'broken_prm.py'}:score")
    (tmp_path / "my_prm.py").write_text(PRM)
    monkeypatch.chdir(tmp_path)
    fn = load_scorer("my_prm:score")  # from the working directory
    tree = Tree(2)
    tree.add_children(0, 0, ["1+1=2\n"], [1.0], [0.0], [False])
    values = make_scorer_fn(fn, ["p", "q"])(tree, np.array([0, 1]), np.array([1, 0]))
    assert values.tolist() == [_prm("1+1=2\n"), 0.0]
    for bad, needle in [(lambda q, p: [0.5], "one number per partial solution: asked for 2, got shape"),
                        (lambda q, p: [float("nan")] * len(p), "non-finite"),
                        (lambda q, p: ["x"] * len(p), "not a list of numbers")]:
        with pytest.raises(UsageError, match=needle):
            make_scorer_fn(bad, ["p", "q"], name="--scorer t")(tree, np.array([0, 1]), np.array([1, 0]))

    def failing(q, p):
        raise ValueError("the reward model's own error")
    with pytest.raises(ValueError, match="the reward model's own error"):  # not relabelled
        make_scorer_fn(failing, ["p", "q"])(tree, np.array([0, 1]), np.array([1, 0]))
    assert str(tmp_path) not in sys.path  # the import left sys.path as it was


def test_scorer_file_is_imported_once(tmp_path):
    from engine.scorers import load_scorer

    (tmp_path / "counting_prm.py").write_text("import builtins\n"
                                              "builtins.prm_loads = getattr(builtins, 'prm_loads', 0) + 1\n"
                                              "def score(q, p):\n    return [0.0] * len(p)\n")
    import builtins

    spec = f"{tmp_path / 'counting_prm.py'}:score"
    assert load_scorer(spec) is load_scorer(spec)
    assert builtins.prm_loads == 1
    del builtins.prm_loads
