"""Every search algorithm and leaf evaluation, run with a real (briefly trained) tiny model."""

import dataclasses

import numpy as np
import pytest
import torch

from engine.config import TrainConfig
from engine.loop import load_policy
from engine.search_runner import play_out, rollout_trajectories, run_search
from envs import MathEnv, arithmetic_tasks
from search import extract_pairs, tree_summary

TASKS = [t for _, t in zip(range(4), arithmetic_tasks(5, levels=(2,)))]


@pytest.fixture(scope="module")
def policy(trained_model_dir, device):
    return load_policy(trained_model_dir, str(device))


@pytest.mark.parametrize(
    ("search", "leaf_eval"),
    [("mcts", "rollout"), ("mcts", "outcome"), ("mcts", "self-eval"), ("mcts", "mix"), ("tot-bfs", "rollout"),
     ("tot-dfs", "self-eval"), ("sample", "rollout")],
)
def test_each_algorithm_builds_consistent_trees(policy, search, leaf_eval):
    cfg = dataclasses.replace(TrainConfig(), search=search, leaf_eval=leaf_eval, simulations=3, num_candidates=3,
                              max_new_tokens=40, step_max_tokens=16, max_depth=6, prune_below=0.0)
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
    if leaf_eval == "rollout" and search != "sample":
        assert record and all(len(r) == 4 for r in record)
        trajs = rollout_trajectories(tree, record, prompts=[t["prompt"] for t in TASKS],
                                     task_ids=[t["task_id"] for t in TASKS], iteration=1)
        assert all(t["source"] == "rollout" for t in trajs)
    extract_pairs(tree, prompts=[t["prompt"] for t in TASKS], task_ids=[t["task_id"] for t in TASKS])


def test_play_out_scores_a_reference_solution():
    env = MathEnv()
    task = TASKS[0]
    env.reset(options={"task": task})
    reward, steps = play_out(env, env.get_state(), task["solution"] + "junk after the end\n")
    assert reward == 1.0 and "".join(steps) == task["solution"]
    env.reset(options={"task": task})
    assert play_out(env, env.get_state(), "1+1=3\n")[0] == 0.0


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


def rollout_lines(text, k):
    """The first ``k`` non-blank lines of ``text``, each ending in a newline (as rollouts record them)."""
    return [line + "\n" for line in text.split("\n") if line.strip()][:k]


@pytest.mark.parametrize("rollouts", [1, 2])
def test_rollouts_continue_the_samples_that_proposed_the_steps(policy, rollouts):
    cfg = dataclasses.replace(TrainConfig(), simulations=3, num_candidates=3, rollouts=rollouts, max_new_tokens=40,
                              step_max_tokens=16, max_depth=6)
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
