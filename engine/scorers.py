"""Node values other than rollouts, for :mod:`engine.search_runner`: the policy's self-evaluation
(MCTS-DPO), an external scorer named by ``--scorer`` (a process reward or value model), and Agent
Q's critic, whose scores extraction mixes with the search's Q."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine.errors import UsageError
from search import Tree

__all__ = ["load_scorer", "make_scorer_fn", "make_self_eval_fn", "score_unscored", "with_critic"]


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


def with_critic(evaluate_fn, critic):
    """Agent Q's critic (Putta et al., 2024, Sec. 4.2-4.3): nodes are valued by ``evaluate_fn`` for
    the search, and ``critic`` (an ``evaluate_fn`` too) scores each of them into ``tree.critic``,
    which extraction mixes with the search's Q (``alpha * Q + (1 - alpha) * critic``, see
    :func:`search.extract_pairs`). The search values terminal steps by their reward, without
    ``evaluate_fn``: :func:`score_unscored` gives them their critic scores after it."""

    def both(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray) -> np.ndarray:
        tree.set_critic(tree_index, node_index, critic(tree, tree_index, node_index))
        return evaluate_fn(tree, tree_index, node_index)

    return both


def score_unscored(tree: Tree, critic) -> int:
    """Critic scores, in one batched ``critic`` call (an ``evaluate_fn``), for every node but the
    roots that has none: the steps a search valued without its ``evaluate_fn`` (terminal ones, by
    their reward; every step of a sampling search), so that every sibling ranks by the same mix of
    Q and critic at extraction (Agent Q's critic scores every proposed action). Returns the number
    scored."""
    width = int(tree.node_count.max())
    made = np.arange(width)[None, :] < tree.node_count[:, None]
    tb, nb = np.nonzero(made & np.isnan(tree.critic[:, :width]) & (tree.parent[:, :width] >= 0))
    if len(tb):
        tb, nb = tb.astype(np.int32), nb.astype(np.int32)
        tree.set_critic(tb, nb, np.asarray(critic(tree, tb, nb), np.float64))
    return len(tb)


def load_scorer(spec: str) -> Callable:
    """The function ``--scorer`` names: ``MODULE:FUNCTION`` (importable from the working directory)
    or ``FILE.py:FUNCTION``; a :class:`UsageError` saying what is wrong otherwise. A module is
    imported once per process (a scorer that loads a model at import does so once, not per search)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise UsageError(f"--scorer {spec!r}: give MODULE:FUNCTION or FILE.py:FUNCTION, e.g. my_prm:score")
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise UsageError(f"--scorer {spec}: no such file {where}")
            key = f"engine_scorer_{abs(hash(str(path))):x}"  # one module per file, kept as imports are
            module = sys.modules.get(key)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(key, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[key] = module
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[key]
                    raise
        else:
            sys.path.insert(0, os.getcwd())  # the working directory, for this import only
            try:
                module = importlib.import_module(where)
            finally:
                sys.path.remove(os.getcwd())
    except UsageError:
        raise
    except Exception as exc:  # the user's module failed to import: say so, with its own message
        raise UsageError(f"--scorer {spec}: importing {where} failed ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--scorer {spec}: {where} has no function {name}")
    return fn


def make_scorer_fn(scorer: Callable, prompts: Sequence[str], *, name: str = "scorer"):
    """``evaluate_fn`` from an external scorer (a process reward or value model):
    ``scorer(task prompts, partial solutions)`` (two lists of strings, one of each per node) returns
    one finite number per node; anything else is a :class:`UsageError` naming ``name`` (what the
    scorer itself raises goes on as it is)."""

    def evaluate_fn(tree: Tree, tree_index: np.ndarray, node_index: np.ndarray) -> np.ndarray:
        questions = [prompts[b] for b in tree_index]
        partials = [tree.prefix_text(b, n) for b, n in zip(tree_index, node_index)]
        returned = scorer(questions, partials)
        fix = "; fix it and continue the run with --resume"
        try:
            values = np.asarray(returned, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{name} returned something that is not a list of numbers ({exc}){fix}") from None
        if values.shape != (len(partials),):
            raise UsageError(f"{name} must return one number per partial solution: asked for {len(partials)}, "
                             f"got shape {values.shape}{fix}")
        if not np.isfinite(values).all():
            raise UsageError(f"{name} returned non-finite values (NaN or inf){fix}")
        return values

    return evaluate_fn
