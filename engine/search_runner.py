"""Glue between a policy, an environment and :mod:`search`: the plug-in callables for MCTS."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from search import Candidate, Tree, mcts, sample_trajectories, tot_bfs, tot_dfs

__all__ = [
    "make_expand_fn",
    "make_rollout_evaluate_fn",
    "make_sample_fn",
    "make_self_eval_fn",
    "mix_evaluators",
    "play_out",
    "walk_lines",
    "rollout_trajectories",
    "run_search",
]


def _line(text: str) -> str:
    """A step as stored in the tree: one line ending in a newline."""
    return text.split("\n", 1)[0] + "\n"


def walk_lines(env, state, continuation: str) -> list[Candidate]:
    """Step ``env`` from ``state`` through the non-empty lines of ``continuation`` until the episode
    ends; one step (text ending in a newline, reward, terminal flag, state after it) per line taken."""
    env.set_state(state)
    steps: list[Candidate] = []
    for line in continuation.split("\n"):
        if not line.strip():
            continue
        _, reward, terminated, truncated, _ = env.step(line)
        steps.append(Candidate(_line(line), 0.0, 1, reward=float(reward), terminal=bool(terminated or truncated),
                               state=env.get_state()))
        if terminated or truncated:
            break
    return steps


def play_out(env, state, continuation: str) -> tuple[float, list[str]]:
    """Step ``env`` from ``state`` through the lines of ``continuation``. Returns the final reward
    (0 when the text ends before the episode does) and the steps taken, each ending in a newline."""
    steps = walk_lines(env, state, continuation)
    reward = steps[-1].reward if steps and steps[-1].terminal else 0.0
    return reward, [c.text for c in steps]


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


def make_self_eval_fn(policy, prompts: Sequence[str], *, question: str, verdicts: tuple[str, str]):
    """MCTS-DPO's self-evaluation (Xie et al., 2024, Sec. 2.1): the policy reads the partial
    solution followed by ``question`` and the node's value is the probability it puts on the
    positive verdict, normalised over the two verdicts."""

    def evaluate_fn(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray) -> np.ndarray:
        contexts = [prompts[b] + tree.prefix_text(b, n) + question for b, n in zip(tree_index, node_index)]
        yes = policy.logprobs(contexts, [verdicts[0]] * len(contexts))
        no = policy.logprobs(contexts, [verdicts[1]] * len(contexts))
        return 1.0 / (1.0 + np.exp(no - yes))

    return evaluate_fn


def mix_evaluators(search_value, critic, alpha: float):
    """Agent Q's mix (Putta et al., 2024, Sec. 4.2): ``alpha * search value + (1 - alpha) * critic``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    def evaluate_fn(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray) -> np.ndarray:
        return (alpha * np.asarray(search_value(tree, tree_index, node_index))
                + (1 - alpha) * np.asarray(critic(tree, tree_index, node_index)))

    return evaluate_fn


def make_sample_fn(policy, env, prompts: Sequence[str], *, temperature: float, max_new_tokens: int):
    """``sample_fn`` for :func:`search.sample_trajectories`: whole completions, cut into line steps
    and stepped through ``env`` for rewards and states."""

    def sample_fn(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray, k: int):
        contexts = [prompts[b] + tree.prefix_text(b, n) for b, n in zip(tree_index, node_index)]
        samples = policy.generate(contexts, num_samples=k, temperature=temperature,
                                  max_new_tokens=max_new_tokens, stop=None)
        out = []
        for b, n, group in zip(tree_index, node_index, samples):
            trajs = [walk_lines(env, tree.states[b][n], s.text) for s in group]
            out.append([t for t in trajs if t])
        return out

    return sample_fn


def run_search(policy, env, tasks: Sequence[dict], cfg, progress: Callable[[int, int], None] | None = None,
               rollout_record: list | None = None) -> Tree:
    """Search every task with ``cfg.search`` (mcts, tot-bfs, tot-dfs or sample) and the leaf
    evaluation ``cfg.leaf_eval``; returns the batch of trees (one per task). Rollouts are appended
    to ``rollout_record`` when given (see :func:`make_rollout_evaluate_fn`)."""
    roots = []
    for task in tasks:
        env.reset(options={"task": task})
        roots.append(env.get_state())
    prompts = [t["prompt"] for t in tasks]
    tree = Tree(len(tasks), capacity=1 + cfg.simulations * cfg.num_candidates, root_states=roots)
    if cfg.search == "sample":
        return sample_trajectories(tree, sample_fn=make_sample_fn(policy, env, prompts, temperature=cfg.temperature,
                                                                  max_new_tokens=cfg.max_new_tokens),
                                   num_samples=cfg.simulations, progress=progress)
    rollouts = make_rollout_evaluate_fn(policy, env, prompts, rollouts=cfg.rollouts, temperature=cfg.temperature,
                                        max_new_tokens=cfg.max_new_tokens, record=rollout_record)
    judge = make_self_eval_fn(policy, prompts, question=cfg.self_eval_question,
                              verdicts=(cfg.self_eval_yes, cfg.self_eval_no))
    evaluate_fn = {"rollout": rollouts, "outcome": None, "self-eval": judge,
                   "mix": mix_evaluators(rollouts, judge, cfg.alpha)}[cfg.leaf_eval]
    expand_fn = make_expand_fn(policy, env, prompts, num_candidates=cfg.num_candidates,
                               temperature=cfg.temperature, step_max_tokens=cfg.step_max_tokens)
    if cfg.search == "mcts":
        return mcts(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, num_simulations=cfg.simulations,
                    c_puct=cfg.c_puct, rule=cfg.rule, leaves_per_tree=cfg.leaves_per_tree,
                    backup_mode=cfg.backup, max_depth=cfg.max_depth, progress=progress)
    if evaluate_fn is None:
        raise ValueError("tree-of-thoughts search needs a leaf evaluation; --leaf-eval outcome is for mcts")
    if cfg.search == "tot-bfs":
        return tot_bfs(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, beam_width=cfg.beam_width,
                       max_depth=cfg.max_depth, progress=progress)
    return tot_dfs(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, max_expansions=cfg.simulations,
                   prune_below=cfg.prune_below, max_depth=cfg.max_depth, progress=progress)


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
