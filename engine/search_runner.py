"""Glue between a policy, an environment and :mod:`search`: the plug-in callables for MCTS."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from engine.scorers import load_scorer, make_scorer_fn, make_self_eval_fn, score_unscored, with_critic
from search import Candidate, Tree, back_up, mcts, sample_trajectories, step_returns, tot_bfs, tot_dfs

__all__ = [
    "make_expand_fn",
    "make_rollout_evaluate_fn",
    "make_sample_fn",
    "ParkedRollouts",
    "play_out",
    "Rollout",
    "walk_lines",
    "rollout_trajectories",
    "run_search",
]


def _line(text: str) -> str:
    """A step as stored in the tree: one line ending in a newline."""
    return text.split("\n", 1)[0] + "\n"


def _steps(env, state, continuation: str):
    """Step ``env`` from ``state`` through the non-empty lines of ``continuation`` until the episode
    ends, yielding each line taken (ending in a newline), its reward and whether it ended it."""
    env.set_state(state)
    for line in continuation.split("\n"):
        if not line.strip():
            continue
        _, reward, terminated, truncated, _ = env.step(line)
        ended = bool(terminated or truncated)
        yield line + "\n", float(reward), ended
        if ended:
            return


def walk_lines(env, state, continuation: str) -> list[Candidate]:
    """Step ``env`` from ``state`` through the non-empty lines of ``continuation`` until the episode
    ends; one step (text ending in a newline, reward, terminal flag, state after it) per line taken."""
    return [Candidate(text, 0.0, 1, reward=reward, terminal=ended, state=env.get_state())
            for text, reward, ended in _steps(env, state, continuation)]


class Rollout(NamedTuple):
    """What :func:`play_out` found."""

    value: float
    """The discounted return of the rollout's steps, ``sum_k gamma**k * r_k`` (the value of the
    node it starts from, for the search)."""
    steps: list[str]
    """The steps taken, each ending in a newline."""
    total: float
    """The undiscounted return, the sum of the steps' rewards (for trajectory records)."""


def play_out(env, state, continuation: str, gamma: float = 1.0) -> Rollout:
    """Step ``env`` from ``state`` through the lines of ``continuation`` until the episode ends.
    Returns its return, discounted by ``gamma`` and not (for the math environment, both the final
    reward when ``gamma`` is 1: 1 for a correct answer; 0 when the text ends before the episode
    does), and the steps taken (no state or :class:`search.Candidate` per step: a rollout needs
    only its outcome)."""
    steps: list[str] = []
    value = total = 0.0
    for text, reward, _ in _steps(env, state, continuation):
        value += gamma ** len(steps) * reward
        steps.append(text)
        total += reward
    return Rollout(value, steps, total)


@dataclass
class _Parked:
    """A rollout still being sampled: the child it values (``node``, -1 until the child is made),
    the context that continues it, its text so far and the tokens it may still take."""

    tree: int
    parent: int
    step: str
    context: str
    text: str
    tokens_left: int
    node: int = -1


class ParkedRollouts:
    """Rollouts that an expansion call handed back still running (``generate(..., park=N)``): each
    goes on as one more row of the next expansion call, and its child's value is backed up when it
    ends (``back_up_fn(trees, nodes, values)``, each value its rollout's return discounted by
    ``gamma``), a round or more late; :meth:`drain` ends those left when the search does. Between,
    the child counts as not yet valued (``evaluate_fn`` gives NaN, which :func:`search.back_up`
    skips)."""

    def __init__(self, policy, env, *, rows: int, temperature: float, record: list | None, prefix_kw: dict,
                 back_up_fn: Callable[[list[int], list[int], list[float]], None], gamma: float = 1.0):
        self.policy, self.env, self.rows, self.temperature = policy, env, int(rows), temperature
        self.record, self.prefix_kw, self.back_up_fn, self.gamma = record, prefix_kw, back_up_fn, gamma
        self.waiting: list[_Parked] = []
        self._unclaimed: dict[tuple[int, int, str], _Parked] = {}  # parked by the last call, child not made yet
        self.parked = self.finished = 0

    def add(self, tree: int, parent: int, step: str, context: str, text: str, tokens_left: int) -> None:
        """A rollout parked by the last call (the first one for a step: the child takes one)."""
        if (tree, parent, step) not in self._unclaimed:
            p = _Parked(tree, parent, step, context, text, tokens_left)
            self.waiting.append(p)
            self._unclaimed[(tree, parent, step)] = p

    def claim(self, tree: int, parent: int, step: str, node: int) -> bool:
        """Whether the child ``node`` (of ``parent``, by ``step``) has its rollout parked; it is
        then valued when the rollout ends."""
        p = self._unclaimed.pop((tree, parent, step), None)
        if p is None:
            return False
        p.node = node
        self.parked += 1
        return True

    def going(self) -> list[_Parked]:
        """The rollouts to go on in the next call (those whose child was never made are dropped:
        its step was merged away or refused)."""
        self._unclaimed.clear()
        self.waiting = [p for p in self.waiting if p.node >= 0]
        return list(self.waiting)

    def finish(self, tree: Tree, going: list[_Parked], samples) -> None:
        """Extend ``going`` by their samples (one each); value and back up those that ended."""
        still, done_b, done_n, done_v = [], [], [], []
        for p, (s,) in zip(going, samples):
            p.text, p.context, p.tokens_left = p.text + s.text, p.context + s.text, p.tokens_left - s.num_tokens
            if s.parked and p.tokens_left > 0:
                still.append(p)
                continue
            out = play_out(self.env, tree.states[p.tree][p.node], p.text, self.gamma)
            if self.record is not None:
                self.record.append((p.tree, p.node, out.steps, out.total))
            done_b.append(p.tree)
            done_n.append(p.node)
            done_v.append(out.value)
        gone = {id(p) for p in going}
        self.waiting = [p for p in self.waiting if id(p) not in gone] + still
        self.finished += len(done_b)
        self.back_up_fn(done_b, done_n, done_v)

    def drain(self, tree: Tree) -> None:
        """End every parked rollout (one call, none parked again) and back up their values."""
        going = self.going()
        if going:
            samples = self.policy.generate([p.context for p in going], num_samples=1, temperature=self.temperature,
                                           max_new_tokens=[p.tokens_left for p in going], stop=None,
                                           **self.prefix_kw)
            self.finish(tree, going, samples)


def _prefix_kw(prefix_cache) -> dict:
    """``generate``'s ``prefix_cache`` argument, left out when there is none (policies without
    prefix caching need not take it)."""
    return {} if prefix_cache is None else {"prefix_cache": prefix_cache}


def make_expand_fn(policy, env, prompts: Sequence[str], *, num_candidates: int, temperature: float,
                   step_max_tokens: int, continuations: dict | None = None, max_new_tokens: int = 0,
                   prefix_cache=None, parked: ParkedRollouts | None = None):
    """``expand_fn`` for :func:`search.mcts`: K sampled next lines per node, in one batched call,
    each stepped through ``env`` for its reward, terminal flag and state. A line longer than
    ``step_max_tokens`` tokens is not a step.

    With a ``continuations`` dict (shared with :func:`make_rollout_evaluate_fn`), each sample runs
    on past its first line to the end of the solution (``max_new_tokens`` tokens in all): the first
    line is the proposed step, and the rest is a rollout from the child it creates, which the
    evaluation then uses instead of sampling one. Sampling is autoregressive, so the rest is a
    sample of the policy given the context and the step, exactly what a separate rollout call would
    draw; sharing saves that call, its prompt pass over every child's context, and the idle rows of
    a batch that waits at each step for its longest line. A sample whose first line repeats an
    earlier one's (the two become one child) stops after it (``unique_heads``). With a
    ``prefix_cache`` (``policy.prefix_cache()``), the contexts of the children are kept with their
    keys and values, so that expanding a child later skips the prompt pass over its context.
    With ``parked`` (shared with the evaluation), a call returns once at most ``parked.rows`` of
    its rows still run, all past their first line: those rollouts go on in the next call, with its
    rows, and their children are valued when they end (see :class:`ParkedRollouts`)."""
    shared = continuations is not None
    prefix_kw = _prefix_kw(prefix_cache)
    park = {"park": parked.rows} if shared and parked is not None and parked.rows else {}

    def expand_fn(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray) -> list[list[Candidate]]:
        contexts = [prompts[b] + tree.prefix_text(b, n) for b, n in zip(tree_index, node_index)]
        if shared:
            continuations.clear()  # left over from candidates that were dropped or merged
            going = parked.going() if park else []
            counts, caps = num_candidates, max_new_tokens  # plain numbers unless rollouts go on
            if going:
                counts = [num_candidates] * len(contexts) + [1] * len(going)
                caps = [max_new_tokens] * len(contexts) + [p.tokens_left for p in going]
            samples = policy.generate(contexts + [p.context for p in going], num_samples=counts,
                                      temperature=temperature, max_new_tokens=caps, stop=None, head_stop="\n",
                                      unique_heads=True, **prefix_kw, **park)
            if going:
                parked.finish(tree, going, samples[len(contexts) :])
                samples = samples[: len(contexts)]
        else:
            samples = policy.generate(contexts, num_samples=num_candidates, temperature=temperature,
                                      max_new_tokens=step_max_tokens, stop="\n", **prefix_kw)
        out = []
        for b, n, context, group in zip(tree_index.tolist(), node_index.tolist(), contexts, samples):
            cands = []
            # each text's step is taken once: a sample repeating an earlier one's line is merged into
            # it (search.merge_candidates keeps the first), so only its rollout is new
            terminal_of: dict[str, bool | None] = {}  # None: not a valid action
            for s in group:
                text = _line(s.text)
                if not text.strip() or (shared and s.head_tokens > step_max_tokens):
                    continue
                if text in terminal_of:
                    terminal = terminal_of[text]
                else:
                    env.set_state(tree.states[b][n])
                    _, reward, terminated, truncated, info = env.step(text)
                    terminal = terminal_of[text] = None if info.get("invalid_action") else bool(terminated or truncated)
                    if terminal is not None:
                        cands.append(Candidate(text=text, logprob=s.head_logprob, num_tokens=s.head_tokens,
                                               reward=float(reward), terminal=terminal, state=env.get_state()))
                if terminal is None:
                    continue
                if shared and not terminal and not s.duplicate:
                    rest = s.text.partition("\n")[2]
                    if s.parked:
                        parked.add(b, n, text, context + s.text, rest, max_new_tokens - s.num_tokens)
                    else:
                        continuations.setdefault((b, n, text), []).append(rest)
            out.append(cands)
        return out

    return expand_fn


def make_rollout_evaluate_fn(policy, env, prompts: Sequence[str], *, rollouts: int, temperature: float,
                             max_new_tokens: int, record: list | None = None, continuations: dict | None = None,
                             prefix_cache=None, parked: ParkedRollouts | None = None, gamma: float = 1.0):
    """``evaluate_fn`` that values a node by the mean return (discounted by ``gamma``) of
    ``rollouts`` policy completions.
    Completions that expansion already sampled (``continuations``, keyed by tree, parent and step
    text; see :func:`make_expand_fn`) are used first; only the missing ones are sampled. When
    ``record`` is a list, each rollout is appended to it as ``(tree, node, steps, reward)``
    (``reward``: its undiscounted return). A
    ``prefix_cache`` is read (see :func:`make_expand_fn`). A node whose rollout is ``parked`` (one
    rollout per node) gets NaN, its value to come when the rollout ends."""
    prefix_kw = _prefix_kw(prefix_cache)

    def evaluate_fn(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray) -> np.ndarray:
        nodes = list(zip(tree_index.tolist(), node_index.tolist()))
        texts = [continuations.pop((b, int(tree.parent[b, n]), tree.texts[b][n]), [])[:rollouts]
                 if continuations is not None else [] for b, n in nodes]
        later = [rollouts == 1 and not t and parked is not None
                 and parked.claim(b, int(tree.parent[b, n]), tree.texts[b][n], n) for (b, n), t in zip(nodes, texts)]
        texts = [[None] if wait else t for t, wait in zip(texts, later)]
        for missing in sorted({rollouts - len(t) for t in texts} - {0}):  # one call per count missing
            rows = [j for j, t in enumerate(texts) if rollouts - len(t) == missing]
            contexts = [prompts[nodes[j][0]] + tree.prefix_text(*nodes[j]) for j in rows]
            samples = policy.generate(contexts, num_samples=missing, temperature=temperature,
                                      max_new_tokens=max_new_tokens, stop=None, **prefix_kw)
            for j, group in zip(rows, samples):
                texts[j] = texts[j] + [s.text for s in group]
        values = np.zeros(len(nodes))
        for j, ((b, n), group) in enumerate(zip(nodes, texts)):
            if later[j]:
                values[j] = np.nan
                continue
            outcomes = [play_out(env, tree.states[b][n], text, gamma) for text in group]
            values[j] = np.mean([o.value for o in outcomes])
            if record is not None:
                record.extend((b, n, o.steps, o.total) for o in outcomes)
        return values

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


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector paused for the block. Search allocates many short-lived
    objects that reference counting frees (samples, candidates, states, small tensors); a
    collection would walk every tracked object, model included, again and again in between."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def run_search(policy, env, tasks: Sequence[dict], cfg, progress: Callable[[int, int], None] | None = None,
               rollout_record: list | None = None) -> Tree:
    """Search every task with ``cfg.search`` (mcts, tot-bfs, tot-dfs or sample) and the leaf
    evaluation ``cfg.leaf_eval``; returns the batch of trees (one per task, its ``meta`` the task's
    ``task_id`` and ``prompt``). Rollouts are appended
    to ``rollout_record`` when given (see :func:`make_rollout_evaluate_fn`). The cyclic garbage
    collector is paused meanwhile (see :func:`_gc_paused`)."""
    with _gc_paused():
        return _run_search(policy, env, tasks, cfg, progress, rollout_record)


def _run_search(policy, env, tasks, cfg, progress, rollout_record) -> Tree:
    roots = []
    for task in tasks:
        env.reset(options={"task": task})
        roots.append(env.get_state())
    prompts = [t["prompt"] for t in tasks]
    tree = Tree(len(tasks), capacity=1 + cfg.simulations * cfg.num_candidates, root_states=roots)
    tree.meta = [{"task_id": t["task_id"], "prompt": t["prompt"]} for t in tasks]
    judge = make_self_eval_fn(policy, prompts, question=cfg.self_eval_question,
                              verdicts=(cfg.self_eval_yes, cfg.self_eval_no))
    scorer = make_scorer_fn(load_scorer(cfg.scorer), prompts, name=f"--scorer {cfg.scorer}") if cfg.scorer else None
    critic = scorer or judge  # --leaf-eval mix's
    if cfg.search == "sample":
        sample_trajectories(tree, sample_fn=make_sample_fn(policy, env, prompts, temperature=cfg.temperature,
                                                           max_new_tokens=cfg.max_new_tokens),
                            num_samples=cfg.simulations, progress=progress)
    else:
        _search_trees(tree, policy, env, prompts, cfg, progress, rollout_record, judge, scorer, critic)
    if cfg.leaf_eval == "mix":  # the steps valued without the critic (terminal ones, sampled ones) too
        score_unscored(tree, critic)
    return tree


def _search_trees(tree, policy, env, prompts, cfg, progress, rollout_record, judge, scorer, critic) -> None:
    """MCTS or tree-of-thoughts search of ``tree`` with ``cfg``'s leaf evaluation."""
    # rollouts continue the samples that proposed the steps (see make_expand_fn)
    continuations = {} if cfg.leaf_eval in ("rollout", "mix") else None
    prefix_cache = None  # one per search: its entries hold for the current weights only
    if cfg.prefix_cache_mb and hasattr(policy, "prefix_cache"):
        prefix_cache = policy.prefix_cache(cfg.prefix_cache_mb << 20)
    parked = None  # rollouts that go on in the next round's call (see ParkedRollouts)
    if (cfg.search == "mcts" and cfg.leaf_eval == "rollout" and cfg.rollouts == 1 and cfg.park_rows
            and prefix_cache is not None):
        parked = ParkedRollouts(policy, env, rows=cfg.park_rows, temperature=cfg.temperature, record=rollout_record,
                                prefix_kw=_prefix_kw(prefix_cache),
                                back_up_fn=lambda b, n, v: back_up(tree, b, n, step_returns(tree, b, n, v, cfg.gamma),
                                                                   mode=cfg.backup, gamma=cfg.gamma), gamma=cfg.gamma)
    rollouts = make_rollout_evaluate_fn(policy, env, prompts, rollouts=cfg.rollouts, temperature=cfg.temperature,
                                        max_new_tokens=cfg.max_new_tokens, record=rollout_record,
                                        continuations=continuations, prefix_cache=prefix_cache, parked=parked,
                                        gamma=cfg.gamma)
    evaluate_fn = {"rollout": rollouts, "outcome": None, "self-eval": judge, "scorer": scorer,
                   "mix": with_critic(rollouts, critic)}[cfg.leaf_eval]
    expand_fn = make_expand_fn(policy, env, prompts, num_candidates=cfg.num_candidates,
                               temperature=cfg.temperature, step_max_tokens=cfg.step_max_tokens,
                               continuations=continuations, max_new_tokens=cfg.max_new_tokens,
                               prefix_cache=prefix_cache, parked=parked)
    if cfg.search == "mcts":
        mcts(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, num_simulations=cfg.simulations, c_puct=cfg.c_puct,
             rule=cfg.rule, normalize_q=cfg.normalize_q, leaves_per_tree=cfg.leaves_per_tree, backup_mode=cfg.backup,
             gamma=cfg.gamma, max_depth=cfg.max_depth, commit_every=cfg.commit_every, progress=progress)
        if parked is not None:
            parked.drain(tree)
    elif evaluate_fn is None:
        raise ValueError("tree-of-thoughts search needs a leaf evaluation; --leaf-eval outcome is for mcts")
    elif cfg.search == "tot-bfs":
        tot_bfs(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, beam_width=cfg.beam_width,
                max_depth=cfg.max_depth, progress=progress)
    else:
        tot_dfs(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, max_expansions=cfg.simulations,
                prune_below=cfg.prune_below, max_depth=cfg.max_depth, progress=progress)


def rollout_trajectories(tree: Tree, record: list, *, prompts: Sequence[str], task_ids: Sequence[str],
                         iteration: int) -> list[dict]:
    """Recorded rollouts as trajectory records (the tree path to the node, then the rollout's
    steps), ``"source": "rollout"``; ``reward`` is the trajectory's return, the rewards of the path's
    steps and the rollout's (see :func:`search.extract_trajectories`)."""
    out = []
    for b, n, steps, reward in record:
        path = tree.path(b, n)
        total = float(tree.reward[b, path].sum()) + float(reward)
        out.append({"prompt": prompts[b], "steps": [tree.texts[b][i] for i in path] + list(steps),
                    "reward": total, "correct": total > 0, "task_id": task_ids[b],
                    "iteration": iteration, "source": "rollout"})
    return out
