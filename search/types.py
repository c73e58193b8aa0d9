"""Contracts between the search algorithms and the code that plugs into them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from search.tree import Tree

__all__ = ["Candidate", "EvaluateFn", "ExpandFn", "ProgressFn", "StartFn", "WaitFn"]


@dataclass(frozen=True)
class Candidate:
    """One proposed next step for a node."""

    text: str
    """The step's text, exactly as it continues the prefix (for line steps it ends in ``\\n``)."""
    logprob: float
    """Log-probability of the text under the policy (summed over tokens)."""
    num_tokens: int
    """Number of tokens in ``text``; priors use the length-normalised log-probability."""
    reward: float = 0.0
    """Reward the environment gave for taking this step."""
    terminal: bool = False
    """True when the step ended the episode."""
    state: Any = None
    """Environment state after the step (what ``get_state()`` returned)."""


ExpandFn = Callable[[Tree, np.ndarray, np.ndarray], list[list[Candidate]]]
"""``expand_fn(tree, tree_index [M], node_index [M]) -> M lists of candidates``: propose the
children of each node (one batched policy call for all M nodes)."""

EvaluateFn = Callable[[Tree, np.ndarray, np.ndarray], np.ndarray]
"""``evaluate_fn(tree, tree_index [M], node_index [M]) -> values [M]`` in [0, 1]: estimate the
value of open (non-terminal) nodes, for example by policy rollouts: the return of what follows each
node's step (the search adds the step's own reward, see :mod:`search.mcts`)."""

StartFn = Callable[[Tree, int, int], None]
"""``start_fn(tree, b, node)``: start expanding ``node`` of tree ``b`` and return at once (see
:func:`search.mcts_streamed`)."""

WaitFn = Callable[[Tree], list[tuple[int, int, list[Candidate], np.ndarray]]]
"""``wait_fn(tree) -> [(b, node, candidates, values), ...]``: at least one started expansion that
has come back, with the value of each open candidate (NaN: none, and nothing is backed up for it)."""

ProgressFn = Callable[[int, int], None]
"""``progress(done, total)``: called after each simulation round."""
