"""Tree search over language-model steps on array trees with numba kernels.

Imports neither torch nor transformers: the policy and the environment come in as plug-in
callables (see :mod:`search.types`).
"""

from search.export import to_networkx, tree_from_dict, tree_to_dict
from search.extract import extract_pairs, extract_trajectories
from search.kernels import backup, best_worst_children, puct_select
from search.mcts import mcts, merge_candidates
from search.tree import NO_PARENT, ROOT_INDEX, Tree
from search.types import Candidate, EvaluateFn, ExpandFn, ProgressFn

__all__ = [
    "NO_PARENT",
    "ROOT_INDEX",
    "Candidate",
    "EvaluateFn",
    "ExpandFn",
    "ProgressFn",
    "Tree",
    "backup",
    "best_worst_children",
    "extract_pairs",
    "extract_trajectories",
    "mcts",
    "merge_candidates",
    "puct_select",
    "to_networkx",
    "tree_from_dict",
    "tree_to_dict",
]
