"""Tree search over language-model steps on array trees with numba kernels.

Imports neither torch nor transformers: the policy and the environment come in as plug-in
callables (see :mod:`search.types`).
"""

from search.export import to_networkx, tree_from_dict, tree_to_dict, trees_from_dicts
from search.extract import (
    extract_pairs,
    extract_path_lists,
    extract_sibling_lists,
    extract_trajectories,
    tree_summary,
)
from search.html import TreeView, batch_html, html_page, tree_html
from search.kernels import (
    PUCT,
    UCT,
    backup,
    backup_max,
    backup_visit_weighted,
    best_worst_children,
    puct_select,
    select_leaves,
    synthetic_search,
    visit_policy,
)
from search.mcts import back_up, expand_nodes, mcts, mcts_streamed, merge_candidates, step_returns
from search.tot import SampleFn, sample_trajectories, tot_bfs, tot_dfs
from search.tree import NO_PARENT, ROOT_INDEX, Tree
from search.types import Candidate, EvaluateFn, ExpandFn, ProgressFn, StartFn, WaitFn
from search.view import format_tree, one_line, plot_tree, principal_variation, tree_layout

__all__ = [
    "NO_PARENT",
    "PUCT",
    "ROOT_INDEX",
    "UCT",
    "Candidate",
    "SampleFn",
    "back_up",
    "backup_max",
    "backup_visit_weighted",
    "expand_nodes",
    "sample_trajectories",
    "select_leaves",
    "synthetic_search",
    "tot_bfs",
    "tot_dfs",
    "visit_policy",
    "EvaluateFn",
    "ExpandFn",
    "ProgressFn",
    "StartFn",
    "WaitFn",
    "Tree",
    "backup",
    "best_worst_children",
    "extract_pairs",
    "extract_path_lists",
    "extract_sibling_lists",
    "extract_trajectories",
    "format_tree",
    "TreeView",
    "batch_html",
    "html_page",
    "tree_html",
    "one_line",
    "plot_tree",
    "principal_variation",
    "tree_layout",
    "tree_summary",
    "mcts",
    "mcts_streamed",
    "merge_candidates",
    "puct_select",
    "step_returns",
    "to_networkx",
    "tree_from_dict",
    "trees_from_dicts",
    "tree_to_dict",
]
