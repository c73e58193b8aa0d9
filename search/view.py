"""Trees as text, for a terminal or a notebook: one line per node with its statistics and step.

    >>> print(format_tree(tree, 3, max_depth=4, max_children=3))
    tree 3 · arith-L2-17+25*3 · 9 nodes, depth 4, 8 simulations
    17+25*3
    * N 8  Q +0.625  (root)
    ├─* N 6  Q +0.833  P 0.61  25*3=75
    │   └─* N 5  Q +1.000  P 1.00  17+75=92
    ...

``*`` marks the principal variation: from the root, the most visited child at each level (ties
to the higher prior, then the earlier child), chosen as MCTS-DPO's step commit chooses
(:func:`search.mcts`'s ``commit_every``), here on the finished tree.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping

import numpy as np

from search.tree import ROOT_INDEX, Tree

__all__ = ["format_tree", "one_line", "plot_tree", "principal_variation", "tree_layout"]


def _stats(tree: Tree, b: int):
    n = int(tree.node_count[b])
    visits = tree.visits[b, :n]
    q = np.divide(tree.value_sum[b, :n], visits, out=np.zeros(n), where=visits > 0)
    return visits, q


def principal_variation(tree: Tree, b: int = 0, node: int = ROOT_INDEX) -> list[int]:
    """The nodes from ``node`` down, taking the most visited child at each level (ties to the
    higher prior, then the lower index: the step commit's rule) until a node without a visited
    child."""
    visits, prior = tree.visits[b], tree.prior[b]
    path = [node]
    while tree.num_children[b, node] > 0:
        kids = tree.children(b, node)
        best = max(kids, key=lambda c: (visits[c], prior[c], -c))
        if visits[best] == 0:
            break
        path.append(best)
        node = best
    return path


def _subtree_sizes(tree: Tree, b: int) -> np.ndarray:
    """Per node, the number of nodes in its subtree (itself included)."""
    n = int(tree.node_count[b])
    size = np.ones(n, np.int64)
    parent = tree.parent[b, :n]
    for i in np.argsort(-tree.depth[b, :n], kind="stable").tolist():  # deepest first: children before parents
        if parent[i] >= 0:
            size[parent[i]] += size[i]
    return size


def _check(tree: Tree, b: int, node: int, max_depth: int | None, order: str) -> None:
    if not 0 <= b < tree.batch_size:
        raise IndexError(f"tree {b} out of range: the batch holds {tree.batch_size} trees (0..{tree.batch_size - 1})")
    count = int(tree.node_count[b])
    if not 0 <= node < count:
        raise IndexError(f"node {node} out of range: tree {b} has {count} nodes (0..{count - 1})")
    if order not in ("visits", "index"):
        raise ValueError(f"order must be 'visits' or 'index', got {order!r}")
    if max_depth is not None and max_depth < 0:
        raise ValueError(f"max_depth must be >= 0 or None, got {max_depth}")


def _ordered(tree: Tree, b: int, node: int, order: str) -> list[int]:
    """``node``'s children: most visited first (ties as :func:`principal_variation`'s, so that a
    marked child comes first) for ``"visits"``, in tree order for ``"index"``."""
    kids = list(tree.children(b, node))
    if order == "visits":
        visits, prior = tree.visits[b], tree.prior[b]
        kids.sort(key=lambda c: (-visits[c], -prior[c], c))
    return kids


def tree_heading(tree: Tree, b: int) -> str:
    """``tree b``, with its ``meta`` task id when it has one (on one line)."""
    task = (tree.meta[b] or {}).get("task_id")
    return f"tree {b}" + (f" · {one_line(str(task))}" if task is not None else "")


def _count(k: int, one: str, many: str) -> str:
    return f"{k} {one if k == 1 else many}"


def _cells(ch: str) -> int:
    """Terminal columns a character takes (wide East Asian characters two)."""
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def one_line(text: str, room: int | None = None) -> str:
    """``text`` on one line for a terminal: line breaks shown as ``⏎`` (a trailing one dropped),
    tabs as spaces, other control characters (terminal escape sequences included) as ``\\xNN``
    escapes, cut to ``room`` terminal columns (at least 8) with ``…``; ``""`` for an empty text."""
    text = text.replace("\r\n", "\n")
    text = text[:-1] if text.endswith("\n") else text
    text = "".join("⏎" if ch == "\n" else " " if ch == "\t" else ch if ch.isprintable() else
                   f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}" for ch in text)
    if not text:
        return '""'
    if room is None:
        return text
    room, used = max(room, 8) - 1, 0  # one column for the …
    if sum(map(_cells, text)) <= room + 1:
        return text
    for i, ch in enumerate(text):
        used += _cells(ch)
        if used > room:
            return text[:i] + "…"
    return text


def format_tree(tree: Tree, b: int = 0, *, node: int = ROOT_INDEX, max_depth: int | None = None,
                max_children: int | None = None, order: str = "visits", width: int | None = 100,
                marks: Mapping[int, str] | None = None) -> str:
    """Tree ``b`` (the subtree of ``node``) as text: a header (tree, its ``meta`` task id and
    prompt when it has them, nodes, depth, the root's visits), then one line per node::

        ├─* N 6  Q +0.833  P 0.61  r 1  C 0.72  END  25*3=75

    visits N, Q (W / N; ``-`` while unvisited), prior P, then only where they apply the step's
    reward r, its critic score C and END for a terminal step, and the step's text on one line.
    ``*`` marks the principal variation (:func:`principal_variation`).

    ``max_depth``: levels shown below ``node`` (deeper ones summed up as ``… k nodes below``);
    ``max_children``: children shown per node (the rest summed up with their visits);
    ``order``: children by ``"visits"`` (most first; ties as :func:`principal_variation`'s, so
    that a marked child comes first) or in tree order (``"index"``); ``width``: terminal columns
    per line, the texts cut to fit (None: never cut); ``marks``: text to add to a node's
    statistics, by node (e.g. the pairs it is in: ``engine show``). Texts are shown by
    :func:`one_line`, so that no step can send control sequences to the terminal."""
    _check(tree, b, node, max_depth, order)
    if max_children is not None and max_children < 1:
        raise ValueError(f"max_children must be >= 1 or None, got {max_children}")
    count = int(tree.node_count[b])
    visits, q = _stats(tree, b)
    texts, critic = tree.texts[b], tree.critic[b]
    on_path = set(principal_variation(tree, b, node))
    size = _subtree_sizes(tree, b)
    base = int(tree.depth[b, node])
    meta = tree.meta[b] or {}

    lines = [tree_heading(tree, b) + f" · {count} nodes, depth {int(tree.depth[b, :count].max())}, "
             f"{int(visits[ROOT_INDEX])} simulations"]
    if node != ROOT_INDEX:
        lines.append(f"subtree of node {node} (depth {base})")
    if isinstance(meta.get("prompt"), str):
        lines.append(one_line(meta["prompt"], width))

    def label(i: int) -> str:
        parts = [f"N {int(visits[i])}", f"Q {q[i]:+.3f}" if visits[i] > 0 else "Q -"]
        if i != node:
            parts.append(f"P {tree.prior[b, i]:.2f}")
        if tree.reward[b, i] != 0:
            parts.append(f"r {tree.reward[b, i]:g}")
        if not math.isnan(critic[i]):
            parts.append(f"C {critic[i]:.2f}")
        if tree.terminal[b, i]:
            parts.append("END")
        if marks and marks.get(i):
            parts.append(marks[i])
        return "  ".join(parts)

    # depth-first with an explicit stack (trees can be deeper than Python's recursion limit):
    # entries (node, indent of its line, its branch mark) or (summary text, indent, mark)
    stack: list[tuple[int | str, str, str]] = []
    prefix = f"* {label(node)}  "  # the node heads its own principal variation
    lines.append(prefix + ("(root)" if node == ROOT_INDEX else
                           one_line(texts[node], None if width is None else width - len(prefix))))

    def push_children(i: int, indent: str) -> None:
        kids = _ordered(tree, b, i, order)
        if max_depth is not None and tree.depth[b, i] - base >= max_depth:
            if kids:
                stack.append((f"… {_count(int(size[i]) - 1, 'node', 'nodes')} below", indent, "└─"))
            return
        shown = kids if max_children is None else kids[:max_children]
        rest = kids[len(shown):]
        entries: list[int | str] = list(shown)
        if rest:
            hidden = int(sum(size[c] for c in rest))
            entries.append(f"… {_count(len(rest), 'more child', 'more children')} ({_count(hidden, 'node', 'nodes')}, "
                           f"{_count(int(sum(visits[c] for c in rest)), 'visit', 'visits')})")
        for k in range(len(entries) - 1, -1, -1):  # reversed: the first child pops first
            stack.append((entries[k], indent, "└─" if k == len(entries) - 1 else "├─"))

    push_children(node, "")
    while stack:
        item, indent, mark = stack.pop()
        if isinstance(item, str):
            lines.append(f"{indent}{mark} {item}")
            continue
        star = "*" if item in on_path else " "
        prefix = f"{indent}{mark}{star} {label(item)}  "
        lines.append(prefix + one_line(texts[item], None if width is None else width - len(prefix)))
        push_children(item, indent + ("    " if mark == "└─" else "│   "))
    return "\n".join(lines)


def _shown(tree: Tree, b: int, node: int, max_depth: int | None, order: str) -> list[int]:
    """``node`` and its descendants down to ``max_depth`` levels below it, depth first, children
    in ``order`` (see :func:`_ordered`)."""
    base = int(tree.depth[b, node])
    out, stack = [], [node]
    while stack:
        i = stack.pop()
        out.append(i)
        if max_depth is None or tree.depth[b, i] - base < max_depth:
            stack.extend(reversed(_ordered(tree, b, i, order)))
    return out


def tree_layout(tree: Tree, b: int = 0, *, node: int = ROOT_INDEX, max_depth: int | None = None,
                order: str = "visits") -> dict[int, tuple[float, float]]:
    """Positions for drawing the subtree of ``node`` (down to ``max_depth`` levels below it):
    ``{node: (x, y)}`` with ``y`` = minus the depth below ``node``, the leaves at x = 0, 1, 2...
    in depth-first order (children most visited first, or in tree order with ``order="index"``,
    as :func:`format_tree` lists them), and each parent centred over its first and last child, so
    that no two edges cross."""
    _check(tree, b, node, max_depth, order)
    shown = _shown(tree, b, node, max_depth, order)
    kept = set(shown)
    kids = {i: [c for c in _ordered(tree, b, i, order) if c in kept] for i in shown}
    x: dict[int, float] = {}
    for i in shown:  # depth first: the leaves from left to right
        if not kids[i]:
            x[i] = float(len(x))
    for i in reversed(shown):  # children before their parents
        if kids[i]:
            x[i] = (x[kids[i][0]] + x[kids[i][-1]]) / 2
    base = int(tree.depth[b, node])
    return {i: (x[i], float(base - tree.depth[b, i])) for i in shown}


def plot_tree(tree: Tree, b: int = 0, *, node: int = ROOT_INDEX, max_depth: int | None = None,
              order: str = "visits", ax=None, labels: bool | None = None, cmap: str = "RdYlGn",
              q_range: tuple[float, float] | None = None):
    """Tree ``b`` (the subtree of ``node``, down to ``max_depth`` levels) drawn with matplotlib on
    ``ax`` (default: a new pyplot figure), laid out by :func:`tree_layout`: one marker per node, its
    area growing with the node's visits and its colour its Q on ``cmap`` with a colour bar (over
    ``q_range``; by default from 0 to 1, widened to the Q of the nodes shown, so that one colour
    means one Q in every plot of rewards in [0, 1]; nodes without a Q grey), terminal steps as
    squares with a black edge, ``+k`` under a node whose ``k`` descendants ``max_depth`` hides; the
    principal variation's edges drawn dark and thick. ``labels``: each node's step text (cut to 14
    columns) beside it, taken as it is (never as mathtext); by default when at most 40 nodes are
    shown. Returns the Axes."""
    import matplotlib.pyplot as plt

    pos = tree_layout(tree, b, node=node, max_depth=max_depth, order=order)
    made = ax is None
    if made:
        width = 1 + max(x for x, _ in pos.values())
        height = 1 - min(y for _, y in pos.values())
        show = labels or (labels is None and len(pos) <= 40)
        _, ax = plt.subplots(figsize=(min(4 + (0.6 if show else 0.3) * width, 24), min(2 + 0.9 * height, 24)))
    try:
        _draw(tree, b, node, pos, ax, labels, cmap, q_range)
    except BaseException:
        if made:
            plt.close(ax.figure)
        raise
    return ax


def _draw(tree: Tree, b: int, node: int, pos: dict, ax, labels, cmap, q_range) -> None:
    """:func:`plot_tree`'s drawing on ``ax``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize

    shown = list(pos)
    visits, q = _stats(tree, b)
    pv = set(principal_variation(tree, b, node))
    edges = [(pos[int(tree.parent[b, i])], pos[i], i in pv) for i in shown if i != node]
    ax.add_collection(LineCollection([(p, c) for p, c, on in edges if not on], colors="0.75", linewidths=1,
                                     zorder=1))
    ax.add_collection(LineCollection([(p, c) for p, c, on in edges if on], colors="0.15", linewidths=2.5, zorder=1,
                                     label="most visited path"))
    valued = [i for i in shown if visits[i] > 0 and np.isfinite(q[i])]
    if q_range is None:
        q_range = (min([0.0, *q[valued].tolist()]), max([1.0, *q[valued].tolist()]))
    norm = Normalize(*q_range)
    top = max(1, int(visits[shown].max()))
    for terminal, marker in ((False, "o"), (True, "s")):
        group = [i for i in shown if bool(tree.terminal[b, i]) == terminal]
        for coloured in (True, False):
            ids = [i for i in group if (i in valued) == coloured]
            if not ids:
                continue
            colour = {"c": q[ids], "cmap": cmap, "norm": norm} if coloured else {"c": "0.85"}
            ax.scatter([pos[i][0] for i in ids], [pos[i][1] for i in ids], s=30 + 270 * np.sqrt(visits[ids] / top),
                       marker=marker, edgecolors="black" if terminal else "none", zorder=2, **colour)
    ax.figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="Q", shrink=0.8)
    size = _subtree_sizes(tree, b)
    for i in shown:
        hidden = int(size[i]) - 1 - sum(int(size[c]) for c in tree.children(b, i) if c in pos)
        if tree.num_children[b, i] and hidden:
            ax.annotate(f"+{hidden}", pos[i], xytext=(-6, -6), textcoords="offset points", fontsize=7, color="0.4",
                        ha="right", va="top", zorder=3)
    if labels or (labels is None and len(shown) <= 40):
        for i in shown:
            if i != ROOT_INDEX:
                ax.annotate(one_line(tree.texts[b][i], 14), pos[i], xytext=(5, -5), textcoords="offset points",
                            fontsize=7, rotation=-35, rotation_mode="anchor", ha="left", va="top", zorder=3,
                            parse_math=False, bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none",
                                                    "alpha": 0.75})
    meta = tree.meta[b] or {}
    task = f" · {one_line(str(meta['task_id']), 60)}" if meta.get("task_id") is not None else ""
    ax.set_title(f"tree {b}{task} · {len(shown)} of {int(tree.node_count[b])} nodes", fontsize=9, parse_math=False)
    ax.set_ylabel("depth")
    base = int(tree.depth[b, node])
    depths = sorted({int(-y) for _, y in pos.values()})
    ax.set_yticks([-d for d in depths], [str(base + d) for d in depths])
    ax.set_xticks([])
    ax.margins(x=0.06, y=0.2)  # room for the texts below the last row
    ax.autoscale_view()
