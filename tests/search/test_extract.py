"""Extraction, summary and export on hand-built trees whose statistics are known."""

import json
import math

import numpy as np
import pytest

from search import (
    Tree,
    extract_pairs,
    extract_path_lists,
    extract_sibling_lists,
    extract_trajectories,
    to_networkx,
    tree_from_dict,
    tree_summary,
    tree_to_dict,
)

P, T = ["Q: 2+3\n"], ["t"]


def node_stats(tree, b, node, visits, q):
    tree.visits[b, node] = visits
    tree.value_sum[b, node] = visits * q


def built(texts=("a\n", "b\n", "c\n"), stats=((2, 1.0), (2, 0.5), (1, 0.0))):
    """Root with children ``texts`` (visits, Q); the first child has two children, 'd' (Q 1) and
    'e' (Q 0), 'd' terminal with reward 1."""
    tree = Tree(1)
    kids = tree.add_children(0, 0, list(texts), [1 / len(texts)] * len(texts), [0.0] * len(texts),
                             [False] * len(texts))
    for c, (n, q) in zip(kids, stats):
        node_stats(tree, 0, c, n, q)
    node_stats(tree, 0, 0, sum(n for n, _ in stats), sum(n * q for n, q in stats) / sum(n for n, _ in stats))
    d, e = tree.add_children(0, kids[0], ["d\n", "e\n"], [0.7, 0.3], [1.0, 0.0], [True, False])
    node_stats(tree, 0, d, 1, 1.0)
    node_stats(tree, 0, e, 1, 0.0)
    return tree


def test_best_worst_pairs_exact():
    pairs = extract_pairs(built(), prompts=P, task_ids=T, iteration=2, min_q_gap=0.5, visit_smoothing=True)
    assert [(p["prefix"], p["chosen"], p["rejected"]) for p in pairs] == [("", "a\n", "c\n"), ("a\n", "d\n", "e\n")]
    root = pairs[0]
    assert (root["chosen_q"], root["rejected_q"], root["chosen_visits"], root["rejected_visits"]) == (1.0, 0.0, 2, 1)
    assert root["label_smoothing"] == pytest.approx(1 / 3)  # min(1 - 2/3, 0.5)
    assert pairs[1]["label_smoothing"] == 0.5 and pairs[1]["node_id"] == 1
    assert all(p["iteration"] == 2 and p["task_id"] == "t" for p in pairs)
    # a gap below min_q_gap yields nothing at that node
    assert [p["prefix"] for p in extract_pairs(built(), prompts=P, task_ids=T, min_q_gap=1.01)] == []


def test_all_pairs_exact_and_no_pairs_between_equal_siblings():
    pairs = extract_pairs(built(), prompts=P, task_ids=T, mode="all", min_q_gap=0.5)
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("a\n", "b\n"), ("a\n", "c\n"), ("b\n", "c\n"),
                                                                   ("d\n", "e\n")]
    tied = built(stats=((2, 0.5), (3, 0.5), (1, 0.5)))
    assert [p["chosen"] for p in extract_pairs(tied, prompts=P, task_ids=T, mode="all", min_q_gap=0.0)] == ["d\n"]
    assert [p["chosen"] for p in extract_pairs(tied, prompts=P, task_ids=T, min_q_gap=0.0)] == ["d\n"]


def test_identical_sibling_texts_are_merged_before_extraction():
    # 'a' sampled twice (Q 1 over 1 visit, Q 0 over 3 visits): one child of 4 visits and Q 0.25
    tree = built(texts=("a\n", "b\n", "a\n"), stats=((1, 1.0), (2, 0.5), (3, 0.0)))
    pairs = extract_pairs(tree, prompts=P, task_ids=T, mode="all", min_q_gap=0.0)
    root = [p for p in pairs if p["prefix"] == ""]
    assert [(p["chosen"], p["rejected"], p["chosen_q"], p["rejected_q"], p["rejected_visits"]) for p in root] == [
        ("b\n", "a\n", 0.5, 0.25, 4)]
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    (best,) = [p for p in extract_pairs(tree, prompts=P, task_ids=T, min_q_gap=0.0) if p["prefix"] == ""]
    assert (best["chosen"], best["rejected"]) == ("b\n", "a\n")
    lists = extract_sibling_lists(tree, prompts=P, task_ids=T)
    assert lists[0]["responses"] == ["b\n", "a\n"] and lists[0]["scores"] == [0.5, 0.25]
    assert tree.visits[0, 1] == 1  # the tree itself is left as it was


def test_sibling_and_path_lists_exact():
    tree = built()
    lists = extract_sibling_lists(tree, prompts=P, task_ids=T, iteration=1)
    assert [(ls["prefix"], ls["responses"], ls["scores"]) for ls in lists] == [
        ("", ["a\n", "b\n", "c\n"], [1.0, 0.5, 0.0]), ("a\n", ["d\n", "e\n"], [1.0, 0.0])]
    assert extract_sibling_lists(tree, prompts=P, task_ids=T, min_size=3)[0]["prefix"] == ""
    e = 5
    tree.terminal[0, e] = True  # 'a','e' ends with reward 0
    paths = extract_path_lists(tree, prompts=P, task_ids=T)
    assert paths[0]["responses"] == ["a\nd\n", "a\ne\n"] and paths[0]["scores"] == [1.0, 0.0]
    trajs = extract_trajectories(tree, prompts=P, task_ids=T)
    assert [(t["steps"], t["correct"]) for t in trajs] == [(["a\n", "d\n"], True), (["a\n", "e\n"], False)]
    tree.reward[0, 1] = 0.25  # a reward on the first step too: each trajectory's reward is its return
    assert [t["reward"] for t in extract_trajectories(tree, prompts=P, task_ids=T)] == [1.25, 0.25]
    assert extract_path_lists(tree, prompts=P, task_ids=T)[0]["scores"] == [1.25, 0.25]
    tree.reward[0, 5] = 2.0  # the path to 'e' now returns more than the one to 'd': it ranks first
    assert extract_path_lists(tree, prompts=P, task_ids=T)[0]["responses"] == ["a\ne\n", "a\nd\n"]


def test_agent_q_alpha_mix_ranks_by_q_and_critic():
    tree = built(texts=("a\n", "b\n"), stats=((2, 0.6), (2, 0.5)))
    kids = list(tree.children(0, 0))
    tree.set_critic([0, 0], kids, [0.0, 1.0])
    plain = extract_pairs(tree, prompts=P, task_ids=T, min_q_gap=0.0)[0]
    assert (plain["chosen"], plain["rejected"]) == ("a\n", "b\n") and "chosen_score" not in plain
    mixed = extract_pairs(tree, prompts=P, task_ids=T, min_q_gap=0.0, alpha=0.5)[0]
    assert (mixed["chosen"], mixed["rejected"]) == ("b\n", "a\n")  # 0.5*0.5 + 0.5*1 = 0.75 > 0.5*0.6 = 0.3
    assert (mixed["chosen_q"], mixed["rejected_q"]) == (0.5, 0.6)  # the search's own Q
    assert mixed["chosen_score"] == pytest.approx(0.75) and mixed["rejected_score"] == pytest.approx(0.3)
    assert extract_pairs(tree, prompts=P, task_ids=T, min_q_gap=0.5, alpha=0.5)[0]["prefix"] == "a\n"  # gap 0.45
    lists = extract_sibling_lists(tree, prompts=P, task_ids=T, alpha=0.0)
    assert lists[0]["responses"] == ["b\n", "a\n"] and lists[0]["scores"] == [1.0, 0.0]
    # nodes without a critic score ('d', 'e') rank by Q alone
    inner = [p for p in extract_pairs(tree, prompts=P, task_ids=T, alpha=0.0) if p["prefix"] == "a\n"]
    assert (inner[0]["chosen"], inner[0]["chosen_score"]) == ("d\n", 1.0)
    with pytest.raises(ValueError, match="alpha"):
        extract_pairs(tree, prompts=P, task_ids=T, alpha=1.5)


def test_summary_pair_yield_counts_every_internal_node():
    tree = built(stats=((2, 1.0), (2, 0.5), (1, 0.0)))
    c = tree.add_children(0, 2, ["f\n"], [1.0], [0.0], [False])[0]  # 'b' gets one child: internal, no pair
    node_stats(tree, 0, c, 1, 0.5)
    s = tree_summary(tree, min_q_gap=0.5)
    assert (s["nodes"], s["max_depth"], s["mean_branching"]) == (7, 2, 2.0)
    assert s["pair_yield"] == pytest.approx(2 / 3)
    assert tree_summary(tree, min_q_gap=1.0)["pair_yield"] == pytest.approx(2 / 3)
    assert tree_summary(tree, min_q_gap=1.5)["pair_yield"] == 0.0


def test_export_round_trips_meta_and_critic_and_networkx_attributes():
    tree = built()
    tree.set_critic([0], [2], [0.25])
    tree.meta[0] = {"task_id": "t", "prompt": P[0]}
    data = json.loads(json.dumps(tree_to_dict(tree, 0)))
    assert data["meta"] == {"task_id": "t", "prompt": P[0]} and data["critic"][2] == 0.25 and data["critic"][1] is None
    again = tree_from_dict(data)
    assert tree_to_dict(again, 0) == data
    assert "critic" not in tree_to_dict(built(), 0)  # no critic, no field (older files read the same)
    g = to_networkx(again, 0)
    assert g.number_of_nodes() == 6 and sorted(g.edges) == [(0, 1), (0, 2), (0, 3), (1, 4), (1, 5)]
    attrs = g.nodes[4]
    assert (attrs["text"], attrs["visits"], attrs["q"], attrs["prior"], attrs["reward"], attrs["terminal"],
            attrs["depth"]) == ("d\n", 1, 1.0, 0.7, 1.0, True, 2)
    assert g.nodes[2]["critic"] == 0.25 and math.isnan(g.nodes[1]["critic"])


def test_critic_scores_follow_reroot_and_clear_on_reset():
    tree = built()
    tree.set_critic([0, 0], [4, 5], [0.9, 0.1])
    tree.reroot(0, 1)
    assert tree.critic[0, :3].tolist()[1:] == [0.9, 0.1] and math.isnan(tree.critic[0, 0])
    tree.reset()  # O(B): the root is re-initialised, and each slot as it is taken again
    assert math.isnan(tree.critic[0, 0]) and tree.meta == [None]
    kids = tree.add_children(0, 0, ["x\n", "y\n"], [0.5, 0.5], [0.0, 0.0], [False, False])
    assert np.isnan(tree.critic[0, kids.start : kids.stop]).all() and "critic" not in tree_to_dict(tree, 0)
    with pytest.raises(ValueError, match="finite"):
        tree.set_critic([0], [1], [float("inf")])
