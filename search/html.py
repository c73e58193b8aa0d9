"""Trees as self-contained HTML: nested ``<details>`` elements that open and close without any
script, one per node, for a notebook (``Tree._repr_html_``, :class:`TreeView`) or a browser
(``engine view``). No external files: the styles are inline, so a saved page shows the same
anywhere."""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np

from search.tree import ROOT_INDEX, Tree
from search.view import (
    _check,
    _ordered,
    _stats,
    _subtree_sizes,
    format_tree,
    one_line,
    principal_variation,
    tree_heading,
)

__all__ = ["STYLE", "TreeView", "batch_html", "html_page", "q_colour", "tree_html"]

STYLE = """
.st-tree{font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;color:#222}
.st-tree ul{list-style:none;margin:0;padding-left:1.4em;border-left:1px solid #ddd}
.st-tree>ul{border-left:none;padding-left:0}
.st-tree summary{cursor:pointer}
.st-tree .leaf{padding-left:1.05em}
.st-tree .q{display:inline-block;min-width:4.6em;padding:0 .3em;border-radius:3px;text-align:center}
.st-tree .pv>details>summary>.step,.st-tree .pv>.leaf>.step{font-weight:bold}
.st-tree .pv>details>summary::marker{color:#000}
.st-tree .stat{color:#555}
.st-tree .end{color:#fff;background:#333;border-radius:3px;padding:0 .25em}
.st-tree .chosen{color:#0a6b2d;font-weight:bold}
.st-tree .rejected{color:#a1161b;font-weight:bold}
.st-tree .more{color:#777;font-style:italic}
.st-tree .head{margin:.2em 0 .4em}
.st-tree code{white-space:pre-wrap}
""".strip()

_STOPS = ((0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80)))  # red, yellow, green


def q_colour(q: float, lo: float = 0.0, hi: float = 1.0) -> str:
    """A background colour for Q on a red-yellow-green scale over ``[lo, hi]`` (clipped); grey for
    no Q (NaN)."""
    if not np.isfinite(q):
        return "#ddd"
    t = 0.5 if hi <= lo else min(max((q - lo) / (hi - lo), 0.0), 1.0)
    for (t0, c0), (t1, c1) in zip(_STOPS, _STOPS[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            return "#" + "".join(f"{round(a + f * (b - a)):02x}" for a, b in zip(c0, c1))
    return "#1a9850"


def tree_html(tree: Tree, b: int = 0, *, node: int = ROOT_INDEX, max_depth: int | None = None,
              order: str = "visits", marks: Mapping[int, str] | None = None, open_depth: int = 2,
              max_nodes: int = 5000, q_range: tuple[float, float] | None = None) -> str:
    """Tree ``b`` (the subtree of ``node``, down to ``max_depth`` levels) as an HTML fragment: a
    header (task id, prompt, nodes, depth, simulations), then one nested ``<details>`` per node
    whose line holds its Q (on a red-yellow-green background: 0 to 1, widened to the Q shown, or
    ``q_range``), N, P, and where they apply the reward r, critic score C, END and
    ``marks[node]`` (as :func:`search.format_tree`'s; ``▲k`` and ``▼k``, chosen and rejected in k
    pairs, are coloured), then the step text, HTML-escaped. The
    principal variation (:func:`search.principal_variation`) is bold and open, as are the levels
    above ``open_depth``; children come in ``order`` (as :func:`search.format_tree`'s). At most
    ``max_nodes`` nodes are drawn; what a limit hides is counted. Self-contained: wrap it in
    :func:`html_page` for a file, or show it in a notebook (:class:`TreeView`)."""
    _check(tree, b, node, max_depth, order)
    if max_nodes < 1:
        raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
    count = int(tree.node_count[b])
    visits, q = _stats(tree, b)
    pv = set(principal_variation(tree, b, node))
    size = _subtree_sizes(tree, b)
    base = int(tree.depth[b, node])
    valued = q[(visits > 0) & np.isfinite(q)]
    lo, hi = q_range if q_range is not None else (min([0.0, *valued.tolist()]), max([1.0, *valued.tolist()]))
    marks = marks or {}
    esc = html.escape

    def line(i: int) -> str:
        colour = q_colour(q[i], lo, hi) if visits[i] > 0 else "#ddd"
        parts = [f'<span class="q" style="background:{colour}">'
                 + (f"Q {q[i]:+.3f}" if visits[i] > 0 else "Q –") + "</span>",
                 f'<span class="stat">N {int(visits[i])}']
        if i != node:
            parts[-1] += f" · P {tree.prior[b, i]:.2f}"
        if tree.reward[b, i] != 0:
            parts[-1] += f" · r {tree.reward[b, i]:g}"
        if not np.isnan(tree.critic[b, i]):
            parts[-1] += f" · C {tree.critic[b, i]:.2f}"
        parts[-1] += "</span>"
        if tree.terminal[b, i]:
            parts.append('<span class="end">END</span>')
        for word in (marks.get(i) or "").split():
            kind = {"▲": "chosen", "▼": "rejected"}.get(word[0], "mark")
            parts.append(f'<span class="{kind}">{esc(word)}</span>')
        text = "(root)" if i == ROOT_INDEX else one_line(tree.texts[b][i])
        parts.append(f'<code class="step">{esc(text)}</code>')
        return " ".join(parts)

    out: list[str] = []
    meta = tree.meta[b] or {}
    head = (tree_heading(tree, b) + f" · {count} nodes, depth {int(tree.depth[b, :count].max())}, "
            f"{int(visits[ROOT_INDEX])} simulations")
    out.append(f'<div class="st-tree"><div class="head"><b>{esc(head)}</b>')
    if node != ROOT_INDEX:
        out.append(f"<br>subtree of node {node} (depth {base})")
    if isinstance(meta.get("prompt"), str):
        out.append(f"<br><code>{esc(one_line(meta['prompt']))}</code>")
    out.append("</div><ul>")
    drawn, pending = 0, 1  # nodes drawn, and waiting on the stack
    # depth first with an explicit stack (no recursion limit): node ids, or closing tags
    stack: list[int | str] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
            continue
        i = item
        drawn, pending = drawn + 1, pending - 1
        kids = _ordered(tree, b, i, order)
        cut = max_depth is not None and tree.depth[b, i] - base >= max_depth
        cls = ' class="pv"' if i in pv else ""
        if not kids:
            out.append(f'<li{cls}><div class="leaf">{line(i)}</div></li>')
            continue
        budget = max_nodes - drawn - pending  # children this node may still show
        if cut or budget <= 0:
            hidden = int(size[i]) - 1
            out.append(f'<li{cls}><div class="leaf">{line(i)} <span class="more">… {hidden} node'
                       f'{"" if hidden == 1 else "s"} below</span></div></li>')
            continue
        is_open = " open" if i in pv or tree.depth[b, i] - base < open_depth else ""
        out.append(f"<li{cls}><details{is_open}><summary>{line(i)}</summary><ul>")
        stack.append("</ul></details></li>")
        shown = kids[:budget]
        rest = kids[len(shown):]
        if rest:
            n_rest = int(sum(size[c] for c in rest))
            stack.append(f'<li><div class="leaf more">… {len(rest)} more child{"" if len(rest) == 1 else "ren"} '
                         f'({n_rest} node{"" if n_rest == 1 else "s"})</div></li>')
        stack.extend(reversed(shown))
        pending += len(shown)
    out.append("</ul></div>")
    return "".join(out)


def batch_html(tree: Tree, *, limit: int = 20, open_first: bool = False, **kw) -> str:
    """The first ``limit`` trees of the batch, each a closed ``<details>`` (its header as the line)
    holding its :func:`tree_html` (``kw`` passed on), and a count of the rest."""
    parts = [f'<div class="st-tree"><div class="head"><b>{tree.batch_size} trees, {int(tree.node_count.sum())} '
             f"nodes, {int(tree.visits[:, ROOT_INDEX].sum())} simulations</b></div></div>"]
    for b in range(min(limit, tree.batch_size)):
        title = f"{tree_heading(tree, b)} · {int(tree.node_count[b])} nodes · Q {tree.q(b, ROOT_INDEX):+.3f}"
        parts.append(f'<details{" open" if open_first and b == 0 else ""}><summary>{html.escape(title)}</summary>'
                     f"{tree_html(tree, b, **kw)}</details>")
    if tree.batch_size > limit:
        parts.append(f'<div class="st-tree"><span class="more">… {tree.batch_size - limit} more trees '
                     "(search.TreeView(tree, b) shows tree b)</span></div>")
    return f"<style>{STYLE}</style>" + "".join(parts)


def html_page(title: str, body: str) -> str:
    """A complete HTML document around ``body`` (with the tree styles)."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            "<style>body{margin:1.2em;font-family:system-ui,sans-serif}"
            ".st-table{border-collapse:collapse;font-size:13px}.st-table th,.st-table td{padding:.1em .7em;"
            "border-bottom:1px solid #eee;text-align:right}.st-table td:nth-child(2),.st-table td:last-child,"
            ".st-table th:nth-child(2),.st-table th:last-child"
            f"{{text-align:left;font-family:ui-monospace,monospace}}.st-error{{color:#a1161b}}{STYLE}</style></head>"
            f"<body>{body}</body></html>")


class TreeView:
    """One tree for a notebook: shown as :func:`tree_html` (``_repr_html_``), and as
    :func:`search.format_tree` text by ``repr``/``print``. ``kw``: their common options
    (``node``, ``max_depth``, ``order``)."""

    def __init__(self, tree: Tree, b: int = 0, **kw):
        _check(tree, b, kw.get("node", ROOT_INDEX), kw.get("max_depth"), kw.get("order", "visits"))
        self.tree, self.b, self.kw = tree, b, kw

    def _repr_html_(self) -> str:
        return f"<style>{STYLE}</style>" + tree_html(self.tree, self.b, **self.kw)

    def __repr__(self) -> str:
        return format_tree(self.tree, self.b, width=None, **self.kw)
