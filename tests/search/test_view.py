"""format_tree and principal_variation on hand-built trees whose statistics are known."""

import numpy as np
import pytest

from search import Tree, format_tree, plot_tree, principal_variation, tree_layout
from search.view import one_line


def stats(tree, node, visits, q):
    tree.visits[0, node] = visits
    tree.value_sum[0, node] = visits * q


def built():
    """Root (N 6) with children a (N 2, Q 0.5), b (N 3, Q 1), c (unvisited); b has d (terminal,
    reward 1, critic 0.9) and e (N 1, Q 0, a two-line step)."""
    tree = Tree(1)
    tree.meta[0] = {"task_id": "t-7", "prompt": "Q: 2+3\n"}
    a, b, c = tree.add_children(0, 0, ["a\n", "b\n", "c\n"], [0.5, 0.3, 0.2], [0.0] * 3, [False] * 3)
    stats(tree, 0, 6, 0.75)
    stats(tree, a, 2, 0.5)
    stats(tree, b, 3, 1.0)
    d, e = tree.add_children(0, b, ["#### 5\n", "x\ny\n"], [0.6, 0.4], [1.0, 0.0], [True, False])
    stats(tree, d, 2, 1.0)
    stats(tree, e, 1, 0.0)
    tree.set_critic([0], [d], [0.9])
    return tree


def test_format_tree_exact():
    assert format_tree(built()).splitlines() == [
        "tree 0 · t-7 · 6 nodes, depth 2, 6 simulations",
        "Q: 2+3",
        "* N 6  Q +0.750  (root)",
        "├─* N 3  Q +1.000  P 0.30  b",
        "│   ├─* N 2  Q +1.000  P 0.60  r 1  C 0.90  END  #### 5",
        "│   └─  N 1  Q +0.000  P 0.40  x⏎y",
        "├─  N 2  Q +0.500  P 0.50  a",
        "└─  N 0  Q -  P 0.20  c",
    ]
    marked = format_tree(built(), marks={1: "▲1", 4: "▼2"}).splitlines()
    assert marked[4].endswith("END  ▼2  #### 5") and marked[6] == "├─  N 2  Q +0.500  P 0.50  ▲1  a"
    # in tree order, the principal variation still marked
    assert format_tree(built(), order="index").splitlines()[3:6] == [
        "├─  N 2  Q +0.500  P 0.50  a",
        "├─* N 3  Q +1.000  P 0.30  b",
        "│   ├─* N 2  Q +1.000  P 0.60  r 1  C 0.90  END  #### 5",
    ]


def test_format_tree_limits_count_what_they_hide():
    lines = format_tree(built(), max_depth=1, max_children=1).splitlines()
    assert lines[3:] == ["├─* N 3  Q +1.000  P 0.30  b", "│   └─ … 2 nodes below",
                         "└─ … 2 more children (2 nodes, 2 visits)"]
    assert format_tree(built(), max_depth=0).splitlines()[3:] == ["└─ … 5 nodes below"]
    sub = format_tree(built(), node=2).splitlines()  # the subtree of b
    assert sub[1] == "subtree of node 2 (depth 1)" and sub[3] == "* N 3  Q +1.000  b" and len(sub) == 6


def test_long_steps_are_cut_to_the_width():
    tree = built()
    tree.texts[0][1] = "z" * 500
    line = next(x for x in format_tree(tree, width=60).splitlines() if "zzz" in x)
    assert len(line) == 60 and line.endswith("z…")


def test_principal_variation_breaks_ties_as_the_step_commit_does():
    from search.mcts import _commit

    def committed(tree):
        roots, stopped = np.zeros(1, np.int64), np.zeros(1, np.bool_)
        _commit(tree, roots, stopped, max_depth=10)
        return int(roots[0])

    tree = built()
    assert principal_variation(tree) == [0, 2, 4]
    stats(tree, 1, 3, 0.0)  # a ties b on visits with a lower Q but a higher prior (0.5 against 0.3)
    assert principal_variation(tree)[:2] == [0, 1] == [0, committed(tree)]
    assert format_tree(tree).splitlines()[3].startswith("├─* N 3  Q +0.000  P 0.50  a")  # listed first
    tree.prior[0, 1] = 0.3  # equal priors too: the earlier child
    assert principal_variation(tree)[:2] == [0, 1] == [0, committed(tree)]
    tree.prior[0, 1] = 0.2
    assert principal_variation(tree) == [0, 2, 4] and committed(tree) == 2
    fresh = Tree(1)
    fresh.add_children(0, 0, ["p", "q"], [0.5, 0.5], [0.0, 0.0], [False, False])
    assert principal_variation(fresh) == [0] and committed(fresh) == 0  # no visited child: no step


def test_one_line_neutralises_control_characters_and_counts_columns():
    assert one_line("a\tb\x1b[2Jc\x07\r\nd\n") == "a b\\x1b[2Jc\\x07⏎d"
    assert one_line("") == '""' and one_line("\n") == '""' and one_line("a\r\n") == "a"
    wide = "数" * 20  # two columns each
    cut = one_line(wide, 11)
    assert cut == "数" * 5 + "…" and one_line(wide, 40) == wide
    assert one_line("x" * 30, 3) == "x" * 7 + "…"  # at least 8 columns
    tree = built()
    tree.texts[0][1] = "\x1b]0;title\x07" + "y" * 300
    text = format_tree(tree, width=None)
    assert "\x1b" not in text and "\x07" not in text and "y" * 300 in text


def test_deep_trees_need_no_recursion():
    tree = Tree(1, capacity=4)
    node = 0
    for _ in range(1500):  # deeper than the recursion limit
        node = tree.add_children(0, node, ["s\n"], [1.0], [0.0], [False])[0]
    tree.visits[0, : tree.node_count[0]] = 1
    lines = format_tree(tree).splitlines()
    assert len(lines) == 1501 + 1 and lines[-1].endswith("s")  # header + one line per node
    assert np.array_equal(principal_variation(tree), np.arange(1501))


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(IndexError, match="holds 1 trees"):
        format_tree(built(), 1)
    with pytest.raises(IndexError, match="6 nodes"):
        format_tree(built(), node=9)
    with pytest.raises(ValueError, match="'visits' or 'index'"):
        format_tree(built(), order="q")
    with pytest.raises(ValueError, match="max_children must be >= 1"):
        format_tree(built(), max_children=0)
    assert "6 nodes" in repr(built()) and "format_tree" in repr(built())


def test_tree_layout_puts_leaves_in_order_and_parents_over_their_children():
    # most visited first, as format_tree lists them: b (d, e), a, c
    assert tree_layout(built()) == {0: (1.75, 0.0), 2: (0.5, -1.0), 4: (0.0, -2.0), 5: (1.0, -2.0),
                                    1: (2.0, -1.0), 3: (3.0, -1.0)}
    assert tree_layout(built(), order="index") == {0: (1.5, 0.0), 1: (0.0, -1.0), 2: (1.5, -1.0), 4: (1.0, -2.0),
                                                   5: (2.0, -2.0), 3: (3.0, -1.0)}
    assert tree_layout(built(), max_depth=1) == {0: (1.0, 0.0), 2: (0.0, -1.0), 1: (1.0, -1.0), 3: (2.0, -1.0)}
    assert tree_layout(built(), node=2) == {2: (0.5, 0.0), 4: (0.0, -1.0), 5: (1.0, -1.0)}
    with pytest.raises(ValueError, match="max_depth must be >= 0"):
        tree_layout(built(), max_depth=-1)
    with pytest.raises(IndexError, match="tree -1 out of range"):
        tree_layout(built(), -1)


def test_plot_tree_draws_every_node_edge_and_colour_where_it_says(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection, PathCollection

    tree = built()
    pos = tree_layout(tree)
    ax = plot_tree(tree)
    ax.figure.canvas.draw()  # colours are mapped when drawn
    points = {tuple(map(float, xy)): (c, k) for c in ax.collections if isinstance(c, PathCollection)
              for k, xy in enumerate(c.get_offsets())}
    assert sorted(points) == sorted(pos.values())
    lines = {c.get_label(): sorted(tuple(map(tuple, seg.tolist())) for seg in c.get_segments())
             for c in ax.collections if isinstance(c, LineCollection)}
    thick = lines.pop("most visited path")
    assert thick == sorted([(pos[0], pos[2]), (pos[2], pos[4])])
    assert list(lines.values()) == [sorted([(pos[0], pos[1]), (pos[0], pos[3]), (pos[2], pos[5])])]
    cmap = matplotlib.colormaps["RdYlGn"]
    for node, q in [(0, 0.75), (1, 0.5), (4, 1.0), (5, 0.0)]:  # colours on the fixed 0..1 scale
        col, k = points[pos[node]]
        assert np.allclose(col.get_facecolors()[k], cmap(q)), node
    col, k = points[pos[3]]  # the unvisited child: grey, smallest
    assert col.get_array() is None and np.allclose(col.get_facecolors()[0][:3], 0.85)
    sizes = {node: points[pos[node]][0].get_sizes()[points[pos[node]][1]] for node in (0, 1, 3)}
    assert sizes == pytest.approx({0: 300.0, 1: 30 + 270 * np.sqrt(2 / 6), 3: 30.0})
    assert sorted(t.get_text() for t in ax.texts) == ["#### 5", "a", "b", "c", "x⏎y"]
    ax.figure.savefig(tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt.close("all")
    cut = plot_tree(tree, max_depth=1, labels=False)
    assert [t.get_text() for t in cut.texts] == ["+2"]  # b's two children, hidden
    sub = plot_tree(tree, node=2)
    assert [t.get_text() for t in sub.get_yticklabels()] == ["1", "2"] and list(sub.get_yticks()) == [0, -1]
    assert "3 of 6 nodes" in sub.get_title()
    tree.texts[0][1] = "cost $5 + $6"  # drawn as it is, never as mathtext
    label = next(t for t in plot_tree(tree).texts if "cost" in t.get_text())
    assert label.get_text() == "cost $5 + $6" and label.get_parse_math() is False
    plt.close("all")
    with pytest.raises(ValueError):
        plot_tree(tree, cmap="no-such-map")
    assert plt.get_fignums() == []  # the figure it made is closed
