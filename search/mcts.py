"""Monte-Carlo tree search over language-model steps, many trees at once.

The variant of MCTS-DPO (Xie et al., 2024, "Monte Carlo Tree Search Boosts Reasoning via
Iterative Preference Learning", Sec. 2.1): each round selects leaves by PUCT (eq. 1) or UCT
(Agent Q), expands them with the policy's sampled next steps (identical texts merged, prior from
the length-normalised log-probability), values every new child (terminal children by their reward,
open ones by ``evaluate_fn``) and backs the values up, as running means or in MCTS-DPO's
visit-weighted form (eqs. 3–4).

A node's Q is the return of its step: the reward the environment gave for it plus ``gamma`` times
the value of what follows (``evaluate_fn``'s estimate for a new open node, nothing for a terminal
one), and each ancestor adds its own reward on the way up (``G = r + gamma * G_child``, as mctx
does), in each backup form. With a reward only at the end and ``gamma = 1`` (the math
environment) every return is the episode's outcome.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import numpy as np

from search.kernels import PUCT, UCT, backup, backup_max, backup_visit_weighted, select_leaves
from search.tree import Tree
from search.types import Candidate, EvaluateFn, ExpandFn, ProgressFn, StartFn, WaitFn

__all__ = ["expand_nodes", "merge_candidates", "mcts", "mcts_streamed", "back_up", "step_returns"]


def merge_candidates(candidates: list[Candidate]) -> tuple[list[Candidate], np.ndarray]:
    """Drop repeated texts and compute priors: softmax of length-normalised log-probabilities
    (MCTS-DPO's p(s)^(1/|s|), normalised over siblings). Returns the unique candidates and priors."""
    unique: dict[str, Candidate] = {}
    for c in candidates:
        unique.setdefault(c.text, c)
    kept = list(unique.values())
    if not kept:
        return kept, np.zeros(0)
    scores = np.array([c.logprob / max(c.num_tokens, 1) for c in kept], np.float64)
    scores = np.exp(scores - scores.max())
    return kept, scores / scores.sum()


def _grow(tree: Tree, b: int, node: int, cands: list[Candidate]) -> tuple[list[Candidate], np.ndarray]:
    """Add ``node``'s children from ``cands`` (identical texts merged, priors from their
    log-probabilities); returns the kept candidates and their node indices. With none usable the
    node is a dead end: marked terminal, nothing kept (its value, 0, is the caller's to back up)."""
    kept, priors = merge_candidates(cands)
    if not kept:
        tree.terminal[b, node] = True
        return kept, np.zeros(0, np.int64)
    idx = tree.add_children(b, node, [c.text for c in kept], priors, [c.reward for c in kept],
                            [c.terminal for c in kept], [c.state for c in kept])
    return kept, idx


def step_returns(tree: Tree, trees: list[int], nodes: list[int], values, gamma: float = 1.0) -> list[float]:
    """The returns of steps ``(trees[i], nodes[i])`` given ``values[i]``, the value of what follows
    each (an ``evaluate_fn`` estimate, a rollout's return): ``reward + gamma * value``, what
    :func:`back_up` takes (NaN, a value still to come, stays NaN)."""
    return [float(tree.reward[b, n]) + gamma * float(v) for b, n, v in zip(trees, nodes, values)]


def expand_nodes(
    tree: Tree, tree_index: np.ndarray, node_index: np.ndarray, *, expand_fn: ExpandFn,
    evaluate_fn: EvaluateFn | None, gamma: float = 1.0,
) -> tuple[list[int], list[int], list[float]]:
    """Expand the given nodes with one batched ``expand_fn`` call and value their new children
    with one batched ``evaluate_fn`` call. Returns ``(trees, nodes, returns)`` to back up: every new
    child (terminal ones by their reward; open ones by their reward plus ``gamma`` times
    ``evaluate_fn``'s value, or left out when it is None) and every node the policy could not
    extend (marked terminal, its own reward: nothing follows it)."""
    back_b: list[int] = []
    back_n: list[int] = []
    back_v: list[float] = []
    if not len(tree_index):
        return back_b, back_n, back_v
    proposals = expand_fn(tree, tree_index, node_index)
    if len(proposals) != len(tree_index):
        raise ValueError(f"expand_fn returned {len(proposals)} lists for {len(tree_index)} nodes")
    open_b, open_n = [], []
    for b, node, cands in zip(tree_index.tolist(), node_index.tolist(), proposals):
        kept, idx = _grow(tree, b, node, cands)
        if not kept:  # the policy produced nothing usable: a dead end, nothing after its own step
            back_b.append(b)
            back_n.append(node)
            back_v.append(float(tree.reward[b, node]))
            continue
        for c, i in zip(kept, idx):
            if c.terminal:
                back_b.append(b)
                back_n.append(i)
                back_v.append(float(c.reward))
            else:
                open_b.append(b)
                open_n.append(i)
    if open_b and evaluate_fn is not None:
        est = np.asarray(evaluate_fn(tree, np.asarray(open_b, np.int32), np.asarray(open_n, np.int32)),
                         np.float64)
        if est.shape != (len(open_b),):
            raise ValueError(f"evaluate_fn returned shape {est.shape}, expected ({len(open_b)},)")
        back_b += open_b
        back_n += open_n
        back_v += step_returns(tree, open_b, open_n, est, gamma)
    return back_b, back_n, back_v


def back_up(tree: Tree, trees: list[int], nodes: list[int], values: list[float], *,
            mode: Literal["mean", "visit-weighted", "max"] = "mean", gamma: float = 1.0) -> None:
    """Back the returns of the given nodes' steps (see :func:`step_returns`) up to their roots, each
    ancestor adding its own reward (``G = r + gamma * G_child``), in one kernel call for all of
    them. A NaN value is one still pending (an evaluation that backs it up itself later): it is
    skipped."""
    if not trees:
        return
    tb = np.asarray(trees, np.int32)
    nb = np.asarray(nodes, np.int32)
    vb = np.asarray(values, np.float64)
    known = ~np.isnan(vb)
    if not known.all():
        tb, nb, vb = tb[known], nb[known], vb[known]
    _check_backup_mode(mode)
    if mode == "mean":
        backup(tree.parent, tree.visits, tree.value_sum, tree.reward, tb, nb, vb, float(gamma))
    elif mode == "visit-weighted":
        backup_visit_weighted(tree.parent, tree.first_child, tree.num_children, tree.visits, tree.value_sum,
                              tree.reward, tb, nb, vb, float(gamma))
    else:
        backup_max(tree.parent, tree.visits, tree.value_sum, tree.reward, tb, nb, vb, float(gamma))


def _check_backup_mode(mode: str) -> None:
    if mode not in ("mean", "visit-weighted", "max"):
        raise ValueError(f"backup mode must be 'mean', 'visit-weighted' or 'max', got {mode!r}")


def _revisit_value(tree: Tree, b: int, node: int) -> float:
    """What a repeat visit of a leaf that is not expanded (terminal, or at the depth limit) backs
    up: its Q, or its step's reward when it has none yet (a terminal node, valued by its reward;
    a node never valued, in an outcome-only search: nothing follows its step)."""
    if tree.terminal[b, node] or not tree.visits[b, node]:
        return float(tree.reward[b, node])
    return tree.q(b, node)


def _check(num_simulations: int, c_puct: float, rule: str, gamma: float = 1.0, backup_mode: str = "mean") -> None:
    _check_backup_mode(backup_mode)
    if not 0.0 <= gamma <= 1.0:  # (NaN fails too)
        raise ValueError(f"gamma (the discount) must be in [0, 1], got {gamma}")
    if num_simulations < 0:
        raise ValueError(f"num_simulations must be >= 0, got {num_simulations}")
    if not (math.isfinite(c_puct) and c_puct >= 0):
        raise ValueError(f"c_puct must be a finite number >= 0, got {c_puct}")
    if rule not in ("puct", "uct"):
        raise ValueError(f"rule must be 'puct' or 'uct', got {rule!r}")


def mcts(
    tree: Tree,
    *,
    expand_fn: ExpandFn,
    evaluate_fn: EvaluateFn | None,
    num_simulations: int,
    c_puct: float = 1.0,
    rule: Literal["puct", "uct"] = "puct",
    normalize_q: bool = False,
    leaves_per_tree: int = 1,
    virtual_loss: int = 1,
    backup_mode: Literal["mean", "visit-weighted", "max"] = "mean",
    gamma: float = 1.0,
    max_depth: int = 16,
    commit_every: int = 0,
    progress: ProgressFn | None = None,
) -> Tree:
    """Run ``num_simulations`` rounds of select → expand → evaluate → backup on every tree.

    Each round selects up to ``leaves_per_tree`` distinct leaves per tree (virtual loss spreads
    them), then makes one batched ``expand_fn`` call and one batched ``evaluate_fn`` call for all
    trees. ``evaluate_fn=None`` values only terminal nodes (outcome only). A selected leaf that is
    terminal, or at ``max_depth``, is not expanded: its own value (reward for terminal nodes, else
    its current Q, or its reward when it has never been valued) is backed up again, as a repeat
    visit does in AlphaZero (nothing for a node whose value ``evaluate_fn`` left pending, as NaN).
    ``gamma`` discounts what follows each step in the returns backed up (see the module docstring).

    ``commit_every=k > 0`` searches step by step, as MCTS-DPO does (Xie et al., 2024, Sec. 2.1):
    after every ``k`` rounds each tree commits to the most visited child of its current search
    root (the higher prior on ties; none while no child has a visit) and its later selections
    start there, the committed subtree keeping its statistics. The rest of the tree stays in
    place, so extraction still sees the siblings of every committed step as they were when it was
    committed (values still back up to the tree's root). A tree whose search root is terminal or
    at ``max_depth`` stops; the search ends when every tree has. (:meth:`Tree.reroot` does the
    same commit and also drops the rest, to free the memory.)
    """
    _check(num_simulations, c_puct, rule, gamma, backup_mode)
    if leaves_per_tree < 1 or virtual_loss < 0:
        raise ValueError("leaves_per_tree must be >= 1 and virtual_loss >= 0")
    if commit_every < 0:
        raise ValueError(f"commit_every must be >= 0 (0: no commits), got {commit_every}")
    bsz = tree.batch_size
    leaves = np.zeros((bsz, leaves_per_tree), np.int32)
    roots = np.zeros(bsz, np.int32)  # where each tree's selections start
    stopped = np.zeros(bsz, np.bool_)  # committed to a step that ends its search
    rule_id = PUCT if rule == "puct" else UCT
    pending: set[tuple[int, int]] = set()  # nodes whose value evaluate_fn left pending (NaN)
    for sim in range(num_simulations):
        select_leaves(tree.parent, tree.first_child, tree.num_children, tree.visits, tree.value_sum, tree.prior,
                      tree.node_count, c_puct, rule_id, normalize_q, virtual_loss, roots, leaves)
        leaves[stopped] = -1
        tb, nb = np.nonzero(leaves >= 0)
        nb = leaves[tb, nb]
        tb = tb.astype(np.int32)
        expandable = ~tree.terminal[tb, nb] & (tree.depth[tb, nb] < max_depth)
        back_b, back_n, back_v = [], [], []
        for b, node in zip(tb[~expandable].tolist(), nb[~expandable].tolist()):
            back_b.append(b)
            back_n.append(node)
            if (b, node) in pending and not tree.visits[b, node] and not tree.terminal[b, node]:
                back_v.append(float("nan"))  # its value has not come yet: skipped
            else:
                back_v.append(_revisit_value(tree, b, node))
        eb, en, ev = expand_nodes(tree, tb[expandable], nb[expandable], expand_fn=expand_fn,
                                  evaluate_fn=evaluate_fn, gamma=gamma)
        pending.update((b, n) for b, n, v in zip(eb, en, ev) if v != v)  # NaN: valued later, by the caller
        back_up(tree, back_b + eb, back_n + en, back_v + ev, mode=backup_mode, gamma=gamma)
        if commit_every and (sim + 1) % commit_every == 0:
            _commit(tree, roots, stopped, max_depth)
        if progress is not None:
            progress(num_simulations if stopped.all() else sim + 1, num_simulations)
        if stopped.all():  # every tree has committed to its last step
            break
    return tree


def _commit(tree: Tree, roots: np.ndarray, stopped: np.ndarray, max_depth: int, trees: list[int] | None = None) -> None:
    """Move each tree's search root (of ``trees``, default all) to its most visited child, the
    higher prior first on ties (MCTS-DPO's step commit); a root none of whose children has a visit
    yet stays (no evidence to commit on: outcome-only values, or values still pending). A tree whose
    root is terminal or at ``max_depth`` stops."""
    for b in np.flatnonzero(~stopped).tolist() if trees is None else [b for b in trees if not stopped[b]]:
        root = int(roots[b])
        kids = tree.children(b, root)
        if not len(kids):  # a dead end (marked terminal) or the depth limit; else not expanded yet
            stopped[b] = bool(tree.terminal[b, root]) or tree.depth[b, root] >= max_depth
            continue
        visits = tree.visits[b, kids.start : kids.stop]
        if not visits.any():
            continue
        child = kids[int(np.lexsort((-tree.prior[b, kids.start : kids.stop], -visits))[0])]
        roots[b] = child
        stopped[b] = bool(tree.terminal[b, child]) or tree.depth[b, child] >= max_depth


def mcts_streamed(
    tree: Tree,
    *,
    start_fn: StartFn,
    wait_fn: WaitFn,
    num_simulations: int,
    c_puct: float = 1.0,
    rule: Literal["puct", "uct"] = "puct",
    normalize_q: bool = False,
    backup_mode: Literal["mean", "visit-weighted", "max"] = "mean",
    gamma: float = 1.0,
    max_depth: int = 16,
    in_flight: int = 1,
    commit_every: int = 0,
    progress: ProgressFn | None = None,
) -> Tree:
    """MCTS with every tree searched on its own, expansions started and collected asynchronously:
    for a policy behind a server or an engine with continuous batching, where a tree whose
    expansion has come back should not wait for the slowest tree of a round.

    Each tree selects a leaf and hands it to ``start_fn(tree, b, node)``, which starts its expansion
    (and the evaluation of the children it makes) and returns at once; ``wait_fn(tree)`` blocks
    until at least one started expansion has come back and returns those, as ``(b, node,
    candidates, values)``: ``values[i]`` is the value of ``candidates[i]`` when it is open (of what
    follows its step, as ``evaluate_fn``'s; NaN:
    none, it is not backed up, as with ``evaluate_fn=None`` in :func:`mcts`). The tree adds the
    children (identical texts merged, the first one's value kept), backs their values up, and
    selects its next leaf at once. With ``in_flight=1`` a tree's simulations, and what it selects,
    expands and backs up, are exactly those of :func:`mcts` with ``leaves_per_tree=1`` given the
    same expansions, in whatever order the trees' expansions come back (trees are independent).
    ``in_flight > 1`` keeps up to that many expansions of a tree going at once, each one's path
    holding a virtual loss (a visit worth 0) until it comes back, so that the next selection goes
    elsewhere (asynchronous MCTS, as in AlphaGo); a selection that reaches a leaf still being
    expanded waits for it. ``num_simulations`` counts the simulations started per tree either way.
    ``commit_every=k > 0``: each tree commits a step after every ``k`` of its simulations have
    finished, as :func:`mcts` does after every ``k`` rounds (the virtual visits of its expansions
    still going left out of the count), and stops when it has committed to its last step: it starts
    no more, and adds the expansions still going as they come back. An error from a plug-in leaves
    the tree with its real visit counts (no virtual visits behind).
    """
    _check(num_simulations, c_puct, rule, gamma, backup_mode)
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    if commit_every < 0:
        raise ValueError(f"commit_every must be >= 0 (0: no commits), got {commit_every}")
    bsz = tree.batch_size
    done = np.zeros(bsz, np.int64)
    started = np.zeros(bsz, np.int64)
    going: list[set[int]] = [set() for _ in range(bsz)]
    leaf = np.zeros((1, 1), np.int32)
    roots = np.zeros(bsz, np.int32)  # where each tree's selections start
    stopped = np.zeros(bsz, np.bool_)  # committed to a step that ends its search
    rule_id = PUCT if rule == "puct" else UCT
    reported = 0

    def finished(b: int) -> None:
        nonlocal reported
        done[b] += 1
        if commit_every and done[b] % commit_every == 0 and not stopped[b]:
            with real_visits(b):  # real visits decide the commit
                _commit(tree, roots, stopped, max_depth, [b])
        if progress is None:
            return
        idle = np.fromiter((not g for g in going), np.bool_, count=bsz)
        least = int(np.where(stopped & idle, num_simulations, done).min())  # a stopped tree counts once idle
        if least > reported:
            reported = least
            progress(reported, num_simulations)

    @contextlib.contextmanager
    def real_visits(b: int):
        """Tree ``b`` with the virtual visits of its expansions still going taken out meanwhile."""
        for other in going[b]:
            _virtual(tree, b, other, -1)
        try:
            yield
        finally:
            for other in going[b]:
                _virtual(tree, b, other, 1)

    def real_back_up(b: int, nodes: list[int], values: list[float]) -> None:
        """Back values up in tree ``b`` with real visit counts: the backups that store ``W = Q * N``
        (visit-weighted, max) need them."""
        with real_visits(b):
            back_up(tree, [b] * len(nodes), nodes, values, mode=backup_mode, gamma=gamma)

    def advance(b: int) -> int:
        """Select tree ``b``'s next leaves and start their expansions (up to ``in_flight`` going),
        finishing the simulations that need none on the way; the number started."""
        one = slice(b, b + 1)
        begun = 0
        while started[b] < num_simulations and len(going[b]) < in_flight and not stopped[b]:
            select_leaves(tree.parent[one], tree.first_child[one], tree.num_children[one], tree.visits[one],
                          tree.value_sum[one], tree.prior[one], tree.node_count[one], c_puct, rule_id, normalize_q,
                          1, roots[one], leaf)
            node = int(leaf[0, 0])
            if node in going[b]:
                break  # its expansion has not come back yet
            started[b] += 1
            if not tree.terminal[b, node] and tree.depth[b, node] < max_depth:
                start_fn(tree, b, node)
                going[b].add(node)
                _virtual(tree, b, node, 1)
                begun += 1
                continue
            real_back_up(b, [node], [_revisit_value(tree, b, node)])
            finished(b)
        return begun

    try:
        running = sum(advance(b) for b in range(bsz))
        while running:
            came = wait_fn(tree)
            if not came:
                raise RuntimeError(f"wait_fn returned nothing while {running} expansions were running")
            for b, node, cands, values in came:
                if node not in going[b]:
                    raise ValueError(f"wait_fn returned node {node} of tree {b}, whose expansion was not started")
                running -= 1
                going[b].discard(node)
                _virtual(tree, b, node, -1)
                first = {}
                for i, c in enumerate(cands):
                    first.setdefault(c.text, i)
                kept, idx = _grow(tree, b, node, cands)
                if not kept:  # the policy produced nothing usable: a dead end, nothing after its own step
                    real_back_up(b, [node], [float(tree.reward[b, node])])
                else:
                    vals = [float(c.reward) + (0.0 if c.terminal else gamma * float(values[first[c.text]]))
                            for c in kept]
                    real_back_up(b, [int(i) for i in idx], vals)
                finished(b)
                running += advance(b)
    except BaseException:  # the search stops here: the expansions still going give their virtual visits back
        for b in range(bsz):
            for node in going[b]:
                _virtual(tree, b, node, -1)
        raise
    return tree


def _virtual(tree: Tree, b: int, node: int, visits: int) -> None:
    """Add ``visits`` virtual visits (worth 0) to ``node`` of tree ``b`` and its ancestors."""
    while node >= 0:
        tree.visits[b, node] += visits
        node = int(tree.parent[b, node])
