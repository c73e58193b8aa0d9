"""Tree-statistics throughput: our numba kernels against two references, measured in one run.

Workload (no language model): every expansion adds K = 4 children, nodes at depth 20 are not
expanded, priors are Dirichlet(1) over the K children and leaf values uniform in [0, 1). One
simulation selects a leaf from the root by PUCT (``Q + c_puct * P * sqrt(max(N_parent, 1)) /
(1 + N)``, Q = W / N or 0, strict ``>`` so ties go to the lowest index), expands it and backs its
value up to the root. Priors ``[B, S, K]`` and values ``[B, S]`` are drawn once from a seeded
numpy Generator, so every implementation consumes the same stream.

    A: 1 000 trees x 200 simulations          B: one tree x 200 000 simulations

Implementations:
    ours           ``search.kernels.synthetic_search`` on the arrays of ``search.tree.Tree``
                   (compiled on a tiny input first; best of ``--repeats`` runs, taken in two
                   turns, before and after the references' runs of the same workload, so that
                   ours sees the machine in the states the references see). The headline
                   row reuses one Tree from run to run, emptied by ``Tree.reset`` inside the
                   timed region, as a search loop reuses its Tree from one search to the next.
                   The "ours, fresh" row allocates a new Tree in the timed region instead; on
                   that fresh memory about a fifth of workload A's time goes to first-touch
                   page faults (about 30 MB of arrays), which are allocation cost, not tree work.
                   The references are not penalised by this choice: their node objects come from
                   CPython's allocator, which reuses freed memory on its own, and their time is
                   dominated by interpretation and garbage collection (memory for 800 000 node
                   objects is under 2% of it).
    pure Python    a minimal ``__slots__`` node-object PUCT (below), gc on as in a real process.
                   It must reproduce our root child visit counts exactly; this is asserted.
                   Best of ``--ref-repeats`` runs: every implementation is timed by its best run
                   (as ``timeit`` advises), which on a shared machine is the most repeatable
                   figure for all of them.
    llm-reasoners  ``reasoners.algorithm.MCTS`` driven by a synthetic WorldModel / SearchConfig.
                   It is UCT with Q = np.mean(history), so its trees differ from ours. Its
                   ``_simulate`` (a rollout that expands every node down to the depth limit) is
                   switched off so that one iteration = one expansion + one backup, as in ours.
                   It is slow and slows as its tree grows, so it runs on fewer simulations
                   (``--lr-trees``, ``--lr-big-sims``); the ratio on B is therefore a lower bound.
                   Install: ``.venv/bin/pip install --no-deps llm-reasoners``.

Run from the repository root (``--quick`` for a smaller run, ``--help`` for the sizes):

    .venv/bin/python benchmarks/tree_ops.py

The last line of output is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search import Candidate, mcts  # noqa: E402
from search.kernels import synthetic_search  # noqa: E402
from search.tree import Tree  # noqa: E402

K = 4
MAX_DEPTH = 20
C_PUCT = 1.25
TARGET_VS_PYTHON = 40.0
TARGET_VS_REASONERS = 400.0
TARGET_UPDATES_PER_S = 20e6


def make_inputs(rng: np.random.Generator, trees: int, sims: int) -> tuple[np.ndarray, np.ndarray]:
    priors = rng.dirichlet(np.ones(K), size=(trees, sims))
    values = rng.random((trees, sims))
    return priors, values


# --- ours ------------------------------------------------------------------------------------

ARRAYS = ("parent", "depth", "first_child", "num_children", "visits", "value_sum", "prior", "reward", "terminal",
          "critic")


def run_ours(priors: np.ndarray, values: np.ndarray, tree: Tree | None = None) -> tuple[float, int, Tree]:
    """Seconds, node updates and the grown trees. Without ``tree``, a fresh Tree is allocated inside
    the timed region, and the first-touch page faults of its zero-filled (lazily mapped) arrays
    land in the kernel. With ``tree``, that Tree is emptied by ``Tree.reset`` inside the timed region
    and reused, as a search loop does from one search to the next."""
    start = time.perf_counter()
    t = tree.reset() if tree is not None else Tree(priors.shape[0], capacity=1 + priors.shape[1] * K)
    updates = synthetic_search(*(getattr(t, a) for a in ARRAYS), t.node_count, priors, values, C_PUCT, MAX_DEPTH)
    return time.perf_counter() - start, int(updates), t


def time_ours(priors, values, repeats):
    """Best (minimum) seconds over ``repeats`` runs on fresh Trees and on one reused Tree, node updates,
    and the reused Tree after its last run (for the equality check)."""
    fresh = []
    for _ in range(repeats):
        seconds, updates, _ = run_ours(priors, values)  # the Tree is dropped before the next run
        fresh.append(seconds)
    tree = Tree(priors.shape[0], capacity=1 + priors.shape[1] * K)
    reused = [run_ours(priors, values, tree)[0] for _ in range(repeats)]
    return min(fresh), min(reused), updates, tree


def time_plugins(priors: np.ndarray, values: np.ndarray) -> float:
    """Seconds of :func:`search.mcts` on the same trees and stream through its Python plug-in
    interface, as a language-model search drives it: ``expand_fn`` returns each leaf's K children
    as :class:`search.Candidate` objects (log-probability ``log P``, so that the prior is ``P``),
    and ``evaluate_fn`` values every new child (tree ``b``'s value of the round for all K). Not the
    same search as the kernel's (it backs up K values a round), and not a target: it shows what the
    interface costs per simulation around the kernels (selection and backup are the same kernels;
    each expansion is Python: candidate objects, merging repeated texts, attaching the children)."""
    trees, sims = values.shape
    log_p = np.log(priors)
    texts = [f"s{j}\n" for j in range(K)]
    round_ = [0]

    def expand_fn(tree, tb, nb):
        s = round_[0]
        return [[Candidate(texts[j], float(log_p[b, s, j]), 1) for j in range(K)] for b in tb.tolist()]

    def evaluate_fn(tree, tb, nb):
        return values[tb, round_[0]]

    def progress(done, total):
        round_[0] = done

    tree = Tree(trees, capacity=1 + sims * K)
    start = time.perf_counter()
    mcts(tree, expand_fn=expand_fn, evaluate_fn=evaluate_fn, num_simulations=sims, c_puct=C_PUCT,
         max_depth=MAX_DEPTH, progress=progress)
    return time.perf_counter() - start


def root_visits_ours(t: Tree, b: int) -> list[int]:
    first = int(t.first_child[b, 0])
    return t.visits[b, first:first + int(t.num_children[b, 0])].tolist()


# --- reference (a): pure Python node objects ------------------------------------------------

class Node:
    __slots__ = ("parent", "children", "depth", "prior", "visits", "value_sum")

    def __init__(self, parent, depth, prior):
        self.parent = parent
        self.children = ()  # shared empty tuple until expanded: no list per leaf
        self.depth = depth
        self.prior = prior
        self.visits = 0
        self.value_sum = 0.0


def python_search(priors: list, values: list, c_puct: float, max_depth: int) -> tuple[Node, int]:
    root = Node(None, 0, 1.0)
    updates = 0
    sqrt = math.sqrt
    for p, v in zip(priors, values):
        node = root
        while node.children:
            s = c_puct * sqrt(max(node.visits, 1))
            best = None
            best_score = -math.inf
            for ch in node.children:
                n = ch.visits
                q = ch.value_sum / n if n else 0.0
                # Same operation order as the kernel, so that the float scores are bit-identical
                # and the visit counts can be compared exactly.
                score = q + s * ch.prior / (1.0 + n)
                if score > best_score:
                    best_score = score
                    best = ch
            node = best
        if node.depth < max_depth:
            d = node.depth + 1
            node.children = [Node(node, d, pr) for pr in p]
        while node is not None:
            node.visits += 1
            node.value_sum += v
            node = node.parent
            updates += 1
    return root, updates


def best_of(run, repeats: int):
    """Best seconds over ``repeats`` calls of ``run()``, and the last call's result. The previous
    call's objects are freed before each timed call, outside the timed region."""
    seconds, result = math.inf, None
    for _ in range(repeats):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = run()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds, result


def time_python(priors: np.ndarray, values: np.ndarray, repeats: int):
    """Best seconds over ``repeats`` runs, node updates and the root child visits per tree."""
    # Lists of Python floats are the natural input of pure-Python code; converting is not timed.
    pl, vl = priors.tolist(), values.tolist()
    seconds, results = best_of(lambda: [python_search(pl[b], vl[b], C_PUCT, MAX_DEPTH) for b in range(len(pl))],
                               repeats)
    roots = [[ch.visits for ch in r.children] for r, _ in results]
    return seconds, sum(u for _, u in results), roots


# --- reference (b): llm-reasoners -------------------------------------------------------------

def load_reasoners():
    """The MCTS subclass and its synthetic world, or the reason llm-reasoners is unavailable."""
    try:
        from reasoners import SearchConfig, WorldModel
        from reasoners.algorithm import MCTS
    except Exception as exc:  # any import-time failure (missing dep, broken install) disables it
        return None, f"{type(exc).__name__}: {exc}"

    class OneExpansionMCTS(MCTS):
        def _simulate(self, path):
            # Its rollout would expand every node down to the depth limit (~20 expansions per
            # iteration); without it an iteration is one expansion and one backup, like ours.
            pass

    class World(WorldModel):
        def init_state(self):
            return 0  # the state is the depth

        def step(self, state, action):
            return state + 1, {}

        def is_terminal(self, state):
            return state >= MAX_DEPTH

    class Config(SearchConfig):
        """Feeds the pre-generated stream: one prior row per expansion, one value per new leaf."""

        def __init__(self, priors, values):
            super().__init__()
            self.priors, self.values = iter(priors), iter(values)
            self.current = None

        def get_actions(self, state):
            self.current = next(self.priors)
            return list(range(K))

        def fast_reward(self, state, action):
            return self.current[action], {}

        def reward(self, state, action, **kwargs):
            return next(self.values), {}

    def run(priors: list, values: list):
        mcts = OneExpansionMCTS(w_exp=C_PUCT, depth_limit=MAX_DEPTH, n_iters=len(values),
                                # backs the leaf value up unchanged (default: sum of step rewards)
                                cum_reward=lambda rewards: rewards[-1],
                                # 'max_reward' would add a DFS over the final tree to the timing
                                output_strategy="last_iter")
        return mcts(World(), Config(priors, values)).tree_state

    return run, None


def count_updates(root) -> int:
    total, stack = 0, [root]
    while stack:
        node = stack.pop()
        total += len(node.cum_rewards)
        stack.extend(node.children or ())
    return total


def time_reasoners(run, priors: np.ndarray, values: np.ndarray, repeats: int):
    pl, vl = priors.tolist(), values.tolist()
    seconds, roots = best_of(lambda: [run(pl[b], vl[b]) for b in range(len(pl))], repeats)
    return seconds, sum(count_updates(r) for r in roots)


# --- driver -----------------------------------------------------------------------------------

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", type=int, default=1000, help="workload A: number of trees")
    ap.add_argument("--sims", type=int, default=200, help="workload A: simulations per tree")
    ap.add_argument("--big-sims", type=int, default=200_000, help="workload B: simulations on one tree")
    ap.add_argument("--lr-trees", type=int, default=20, help="llm-reasoners: trees of workload A")
    ap.add_argument("--lr-big-sims", type=int, default=20_000, help="llm-reasoners: simulations of B")
    ap.add_argument("--check-trees", type=int, default=50, help="A trees compared with pure Python")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of ours (the best is reported)")
    ap.add_argument("--ref-repeats", type=int, default=3,
                    help="timed runs of the pure-Python reference and of llm-reasoners on A (the best is "
                         "reported; llm-reasoners on B runs once)")
    ap.add_argument("--plugin-sims", type=int, default=20,
                    help="search.mcts through its Python plug-ins: simulations per tree of A (all its trees)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-reasoners", action="store_true", help="skip llm-reasoners")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.trees, args.big_sims, args.lr_trees, args.lr_big_sims, args.repeats = 100, 20_000, 5, 2_000, 3
        args.ref_repeats = 1
    args.lr_trees = min(args.lr_trees, args.trees)
    args.lr_big_sims = min(args.lr_big_sims, args.big_sims)
    args.check_trees = min(args.check_trees, args.trees)

    rng = np.random.default_rng(args.seed)
    inputs = {"A": make_inputs(rng, args.trees, args.sims), "B": make_inputs(rng, 1, args.big_sims)}
    # Compile once on a tiny input of the same types, so no compile time is counted.
    run_ours(*make_inputs(np.random.default_rng(1), 2, 3))
    run_ours(*make_inputs(np.random.default_rng(1), 2, 3), Tree(2, capacity=1 + 3 * K))

    reasoners_run, why = (None, "--no-reasoners") if args.no_reasoners else load_reasoners()
    if reasoners_run is None:
        print(f"llm-reasoners unavailable ({why}); that reference is skipped")

    print(f"K={K} max_depth={MAX_DEPTH} c_puct={C_PUCT} seed={args.seed} gc={gc.isenabled()} "
          f"A={args.trees}x{args.sims} B=1x{args.big_sims} (single-threaded)")
    rows, summary = [], {}
    for name, (priors, values) in inputs.items():
        sims = priors.shape[0] * priors.shape[1]
        first_turn = (args.repeats + 1) // 2  # ours' runs: this many before the references, the rest after
        f_s, o_s, o_upd, tree = time_ours(priors, values, first_turn)
        p_s, p_upd, py_roots = time_python(priors, values, args.ref_repeats)

        # The reference must be the same search, not merely a similar one.
        check = range(args.check_trees) if name == "A" else range(1)
        for b in check:
            assert root_visits_ours(tree, b) == py_roots[b], f"{name} tree {b}: root child visits differ"
        assert o_upd == p_upd, f"{name}: {o_upd} node updates (ours) vs {p_upd} (pure Python)"
        print(f"check passed: workload {name}, root child visits identical on {len(check)} tree(s) "
              f"(e.g. {py_roots[0]}), node updates identical ({o_upd})")
        del tree, py_roots
        gc.collect()  # free the trees before the next timing, outside it

        if reasoners_run is not None:
            lr_trees = args.lr_trees if name == "A" else 1
            lr_sims = args.sims if name == "A" else args.lr_big_sims
            r_s, r_upd = time_reasoners(reasoners_run, priors[:lr_trees, :lr_sims], values[:lr_trees, :lr_sims],
                                        args.ref_repeats if name == "A" else 1)
        if args.repeats > first_turn:  # ours' second turn, after the references
            f2_s, o2_s, _, tree = time_ours(priors, values, args.repeats - first_turn)
            f_s, o_s = min(f_s, f2_s), min(o_s, o2_s)
            del tree

        o_rate, p_rate = sims / o_s, sims / p_s
        rows += [(name, "ours (numba)", sims, o_s, o_rate, o_upd / o_s, 1.0),
                 (name, "ours, fresh", sims, f_s, sims / f_s, o_upd / f_s, o_rate / (sims / f_s)),
                 (name, "pure Python", sims, p_s, p_rate, p_upd / p_s, o_rate / p_rate)]
        w = {"sims": sims, "ours_sims_per_s": o_rate, "ours_node_updates_per_s": o_upd / o_s,
             "ours_fresh_tree_sims_per_s": sims / f_s, "ours_fresh_tree_node_updates_per_s": o_upd / f_s,
             "python_sims_per_s": p_rate, "python_node_updates_per_s": p_upd / p_s,
             "ratio_vs_python": o_rate / p_rate}
        if reasoners_run is not None:
            r_rate = lr_trees * lr_sims / r_s
            rows.append((name, "llm-reasoners", lr_trees * lr_sims, r_s, r_rate, r_upd / r_s, o_rate / r_rate))
            w.update(reasoners_sims=lr_trees * lr_sims, reasoners_sims_per_s=r_rate,
                     reasoners_node_updates_per_s=r_upd / r_s, ratio_vs_reasoners=o_rate / r_rate)
        summary[name] = w

    priors, values = inputs["A"]
    plugin_sims = min(args.plugin_sims, args.sims)
    time_plugins(priors[:2, :2], values[:2, :2])  # warm-up
    plugin_s = min(time_plugins(priors[:, :plugin_sims], values[:, :plugin_sims]) for _ in range(args.ref_repeats))
    plugin = {"sims": priors.shape[0] * plugin_sims, "sims_per_s": priors.shape[0] * plugin_sims / plugin_s,
              "us_per_sim": plugin_s / (priors.shape[0] * plugin_sims) * 1e6}

    print(f"\n{'workload':<9}{'implementation':<16}{'sims':>9}{'seconds':>10}{'sims/s':>12}"
          f"{'updates/s':>12}{'ours x':>9}")
    for name, impl, sims, sec, rate, upd, ratio in rows:
        print(f"{name:<9}{impl:<16}{sims:>9}{sec:>10.3f}{rate:>12.4g}{upd:>12.4g}{ratio:>9.1f}")
    print(f"\nsearch.mcts() through its Python plug-ins (not a target), A's trees x {plugin_sims} simulations: "
          f"{plugin['sims_per_s']:.4g} sims/s, {plugin['us_per_sim']:.1f} us a simulation (an expansion of K "
          "candidate objects); with a language model one expansion costs milliseconds of generation.")
    if reasoners_run is not None:
        print(f"\nllm-reasoners B ran {args.lr_big_sims} of {args.big_sims} simulations: each of its "
              "selections averages the whole value history of every child it scores, so it slows as "
              "its tree grows and its full-size rate would be lower; the B ratio is a lower bound.")

    print()
    targets = {}
    for name, w in summary.items():
        checks = {"vs_python": (w["ratio_vs_python"], TARGET_VS_PYTHON, "x pure Python"),
                  "node_updates_per_s": (w["ours_node_updates_per_s"], TARGET_UPDATES_PER_S, " node updates/s")}
        if "ratio_vs_reasoners" in w:
            checks["vs_reasoners"] = (w["ratio_vs_reasoners"], TARGET_VS_REASONERS, "x llm-reasoners")
        for key, (value, target, unit) in checks.items():
            ok = value >= target
            targets[f"{name}_{key}"] = ok
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.4g}{unit} (target >= {target:.4g})")

    print(json.dumps({"workloads": summary, "mcts_plugins": plugin, "targets_met": targets,
                      "reasoners_available": reasoners_run is not None,
                      "check_passed": True, "k": K, "max_depth": MAX_DEPTH,
                      "c_puct": C_PUCT, "seed": args.seed}))


if __name__ == "__main__":
    main()
