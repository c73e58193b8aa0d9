"""Glue between a policy, an environment and :mod:`search`: the plug-in callables for MCTS."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from search import Candidate, Tree, mcts

__all__ = ["make_expand_fn", "make_rollout_evaluate_fn", "play_out", "rollout_trajectories", "run_mcts"]


def _line(text: str) -> str:
    """A step as stored in the tree: one line ending in a newline."""
    return text.split("\n", 1)[0] + "\n"


def play_out(env, state, continuation: str) -> tuple[float, list[str]]:
    """Step ``env`` from ``state`` through the lines of ``continuation``. Returns the final reward
    (0 when the text ends before the episode does) and the steps taken, each ending in a newline."""
    env.set_state(state)
    steps: list[str] = []
    for line in continuation.split("\n"):
        if not line.strip():
            continue
        _, reward, terminated, truncated, _ = env.step(line)
        steps.append(_line(line))
        if terminated or truncated:
            return float(reward), steps
    return 0.0, steps


def make_expand_fn(policy, env, prompts: Sequence[str], *, num_candidates: int, temperature: float,
                   step_max_tokens: int):
    """``expand_fn`` for :func:`search.mcts`: K sampled next lines per node, in one batched call,
    each stepped through ``env`` for its reward, terminal flag and state."""

    def expand_fn(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray) -> list[list[Candidate]]:
        contexts = [prompts[b] + tree.prefix_text(b, n) for b, n in zip(tree_index, node_index)]
        samples = policy.generate(contexts, num_samples=num_candidates, temperature=temperature,
                                  max_new_tokens=step_max_tokens, stop="\n")
        out = []
        for b, n, group in zip(tree_index, node_index, samples):
            cands = []
            for s in group:
                text = _line(s.text)
                if not text.strip():
                    continue
                env.set_state(tree.states[b][n])
                _, reward, terminated, truncated, info = env.step(text)
                if info.get("invalid_action"):
                    continue
                cands.append(Candidate(text=text, logprob=s.logprob, num_tokens=s.num_tokens,
                                       reward=float(reward), terminal=bool(terminated or truncated),
                                       state=env.get_state()))
            out.append(cands)
        return out

    return expand_fn


def make_rollout_evaluate_fn(policy, env, prompts: Sequence[str], *, rollouts: int, temperature: float,
                             max_new_tokens: int, record: list | None = None):
    """``evaluate_fn`` that values a node by the mean reward of ``rollouts`` policy completions.
    When ``record`` is a list, each rollout is appended to it as ``(tree, node, steps, reward)``."""

    def evaluate_fn(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray) -> np.ndarray:
        contexts = [prompts[b] + tree.prefix_text(b, n) for b, n in zip(tree_index, node_index)]
        samples = policy.generate(contexts, num_samples=rollouts, temperature=temperature,
                                  max_new_tokens=max_new_tokens, stop=None)
        values = np.zeros(len(contexts))
        for j, (b, n, group) in enumerate(zip(tree_index, node_index, samples)):
            outcomes = [play_out(env, tree.states[b][n], s.text) for s in group]
            values[j] = np.mean([r for r, _ in outcomes])
            if record is not None:
                record.extend((int(b), int(n), steps, r) for r, steps in outcomes)
        return values

    return evaluate_fn


def run_mcts(policy, env, tasks: Sequence[dict], cfg, progress: Callable[[int, int], None] | None = None,
             rollout_record: list | None = None) -> Tree:
    """Search every task with MCTS; returns the batch of trees (one per task). Rollouts are
    appended to ``rollout_record`` when given (see :func:`make_rollout_evaluate_fn`)."""
    roots = []
    for task in tasks:
        env.reset(options={"task": task})
        roots.append(env.get_state())
    prompts = [t["prompt"] for t in tasks]
    tree = Tree(len(tasks), capacity=1 + cfg.simulations * cfg.num_candidates, root_states=roots)
    return mcts(
        tree,
        expand_fn=make_expand_fn(policy, env, prompts, num_candidates=cfg.num_candidates,
                                 temperature=cfg.temperature, step_max_tokens=cfg.step_max_tokens),
        evaluate_fn=make_rollout_evaluate_fn(policy, env, prompts, rollouts=cfg.rollouts,
                                             temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                             record=rollout_record),
        num_simulations=cfg.simulations,
        c_puct=cfg.c_puct,
        max_depth=cfg.max_depth,
        progress=progress,
    )


def rollout_trajectories(tree: Tree, record: list, *, prompts: Sequence[str], task_ids: Sequence[str],
                         iteration: int) -> list[dict]:
    """Recorded rollouts as trajectory records (the tree path to the node, then the rollout's
    steps), ``"source": "rollout"``."""
    out = []
    for b, n, steps, reward in record:
        out.append({"prompt": prompts[b], "steps": [tree.texts[b][i] for i in tree.path(b, n)] + list(steps),
                    "reward": float(reward), "correct": reward > 0, "task_id": task_ids[b],
                    "iteration": iteration, "source": "rollout"})
    return out
