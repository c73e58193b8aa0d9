"""tree_html, batch_html and TreeView on hand-built trees, read back with the standard HTML parser."""

from html.parser import HTMLParser

import pytest
from test_view import built as view_tree

from search import Tree, TreeView, batch_html, format_tree, html_page, tree_html
from search.html import q_colour


class Outline(HTMLParser):
    """The tags of a document, the ``open`` flags of its details, and the texts of its step code."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[str] = []
        self.opened: list[bool] = []
        self.steps: list[str] = []
        self.classes: list[str] = []
        self._in_step = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.classes.append(attrs.get("class") or "")
        if tag == "details":
            self.opened.append("open" in attrs)
        self._in_step = tag == "code" and attrs.get("class") == "step"

    def handle_data(self, data):
        if self._in_step:
            self.steps.append(data)
            self._in_step = False


def built():
    """test_view's tree (root N 6; a N 2, b N 3, c unvisited; b has d, terminal with reward 1, and
    e), with markup in c's step and in the task id."""
    tree = view_tree()
    tree.texts[0][3] = "<script>alert(1)</script>\n"
    tree.meta[0]["task_id"] = "t<1>"
    return tree


def test_one_element_per_node_in_the_text_view_order_with_texts_escaped():
    text = tree_html(built(), marks={4: "▲1", 1: "▼1"})
    page = Outline(text)
    assert page.tags.count("li") == 6 and page.tags.count("details") == 2  # the root and b have children
    assert page.opened == [True, True]  # the principal variation is open
    assert page.steps == ["(root)", "b", "#### 5", "x⏎y", "a", "<script>alert(1)</script>"]  # as format_tree lists
    assert "<script>" not in text and "&lt;script&gt;" in text and "t&lt;1&gt;" in text
    assert [line.split("  ")[-1] for line in format_tree(built()).splitlines()[3:]] == \
        ["b", "#### 5", "x⏎y", "a", "<script>alert(1)</script>"]
    assert page.classes.count("chosen") == 1 and page.classes.count("rejected") == 1
    assert page.classes.count("pv") == 3 and page.classes.count("end") == 1


def test_limits_count_what_they_hide():
    cut = tree_html(built(), max_depth=1)
    assert "… 2 nodes below" in cut and Outline(cut).tags.count("li") == 4
    few = tree_html(built(), max_nodes=3)
    assert Outline(few).tags.count("li") == 4  # the root, b, a and a line for c
    assert "… 1 more child (1 node)" in few and "… 2 nodes below" in few
    deep = Tree(1, capacity=4)
    node = 0
    for _ in range(1500):  # deeper than the recursion limit
        node = deep.add_children(0, node, ["s\n"], [1.0], [0.0], [False])[0]
    assert Outline(tree_html(deep)).tags.count("li") == 1501
    with pytest.raises(ValueError, match="max_nodes"):
        tree_html(built(), max_nodes=0)


def test_q_colours_span_red_to_green_and_grey_without_a_value():
    assert (q_colour(0.0), q_colour(0.5), q_colour(1.0), q_colour(2.0)) == ("#d73027", "#fee08b", "#1a9850", "#1a9850")
    assert q_colour(float("nan")) == "#ddd" and q_colour(-1.0, -1.0, 1.0) == "#d73027"
    text = tree_html(built())
    assert "background:#1a9850\">Q +1.000" in text and "background:#ddd\">Q –" in text


def test_notebook_views():
    tree = built()
    batch = tree._repr_html_()
    assert batch.startswith("<style>") and Outline(batch).tags.count("details") == 3  # the tree's, closed, + 2 inside
    assert "1 trees, 6 nodes, 6 simulations" in batch
    many = Tree(30)
    assert "… 10 more trees" in batch_html(many)
    view = TreeView(tree, 0, max_depth=1)
    assert repr(view) == format_tree(tree, 0, max_depth=1, width=None)
    assert "… 2 nodes below" in view._repr_html_()
    with pytest.raises(IndexError):
        TreeView(tree, 3)
    page = html_page("a <title>", tree_html(tree))
    assert page.startswith("<!doctype html>") and "<title>a &lt;title&gt;</title>" in page
