"""Trees to and from JSON, and to networkx."""

from __future__ import annotations

from typing import Any

import numpy as np

from search.tree import Tree

__all__ = ["tree_from_dict", "tree_to_dict", "trees_from_dicts", "to_networkx"]

_FIELDS = ("parent", "depth", "first_child", "num_children", "visits", "value_sum", "prior",
           "reward", "terminal")


def tree_to_dict(tree: Tree, b: int, *, meta: dict[str, Any] | None = None) -> dict:
    """Tree ``b`` as plain JSON-able data (states are not included: they may not be JSON).
    ``meta``: the caller's data about the tree (default: ``tree.meta[b]``), kept under ``"meta"``.
    Critic scores (``tree.critic``) are written only when some node has one, a missing score as
    null."""
    n = int(tree.node_count[b])
    out: dict[str, Any] = {name: getattr(tree, name)[b, :n].tolist() for name in _FIELDS}
    critic = tree.critic[b, :n]
    if not np.isnan(critic).all():
        out["critic"] = [None if np.isnan(x) else x for x in critic.tolist()]
    out["texts"] = list(tree.texts[b][:n])
    meta = tree.meta[b] if meta is None else meta
    if meta:
        out["meta"] = meta
    return out


def tree_from_dict(data: dict) -> Tree:
    """A one-tree :class:`Tree` rebuilt from :func:`tree_to_dict` output (states are None)."""
    return trees_from_dicts([data])


def trees_from_dicts(datas: list[dict]) -> Tree:
    """A batch :class:`Tree` (tree ``b`` from ``datas[b]``) rebuilt from :func:`tree_to_dict`
    outputs; states are None."""
    sizes = [len(d["texts"]) for d in datas]
    tree = Tree(len(datas), capacity=max([*sizes, 2]))
    for b, (data, n) in enumerate(zip(datas, sizes)):
        for name in _FIELDS:
            arr = getattr(tree, name)
            arr[b, :n] = np.asarray(data[name], dtype=arr.dtype)
        if data.get("critic") is not None:
            tree.set_critic([b] * n, range(n), [np.nan if x is None else x for x in data["critic"]])
        tree.node_count[b] = n
    tree.texts = [list(d["texts"]) for d in datas]
    tree.states = [[None] * n for n in sizes]
    tree.meta = [d.get("meta") for d in datas]
    return tree


def to_networkx(tree: Tree, b: int = 0):
    """Tree ``b`` as a ``networkx.DiGraph`` with node attributes text, visits, q, prior, reward,
    terminal, depth and critic (NaN when none)."""
    import networkx as nx  # imported here: only this export needs it

    g = nx.DiGraph()
    for i in range(int(tree.node_count[b])):
        g.add_node(
            i,
            text=tree.texts[b][i],
            visits=int(tree.visits[b, i]),
            q=tree.q(b, i),
            prior=float(tree.prior[b, i]),
            reward=float(tree.reward[b, i]),
            terminal=bool(tree.terminal[b, i]),
            depth=int(tree.depth[b, i]),
            critic=float(tree.critic[b, i]),
        )
        if tree.parent[b, i] >= 0:
            g.add_edge(int(tree.parent[b, i]), i)
    return g
