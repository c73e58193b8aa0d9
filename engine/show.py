"""``engine show``: a run's search trees, an iteration's at a glance or one node by node.

    engine show runs/NAME                      the latest iteration's trees: summary and table
    engine show runs/NAME --iteration 2 --task arith-L3-17+25*3 [--depth 3] [--children 4]

In a notebook, :func:`load_trees` gives the same trees as a :class:`search.Tree` (``meta`` holding
each tree's task id and prompt), for :func:`search.format_tree`, :func:`search.to_networkx` and
the extraction functions.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import tyro

from engine.errors import UsageError

__all__ = ["ShowArgs", "load_trees", "searched_iterations", "show"]

_ITER = re.compile(r"iter_(\d{3,})$")


@dataclass(frozen=True)
class ShowArgs:
    """Show a run's search trees: an iteration's trees in a table, or one tree node by node."""

    run: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="RUN")]
    """The run directory (runs/NAME)."""
    iteration: int | None = None
    """Iteration whose trees to show; default: the latest one searched."""
    task: str | None = None
    """The tree to show node by node: its task id, or its index in the iteration (0, 1, ...)."""
    depth: int | None = None
    """With --task: levels shown below the root (deeper nodes are counted); default: all."""
    children: int | None = None
    """With --task: children shown per node (the rest are counted); default: all."""
    order: Literal["visits", "index"] | None = None
    """With --task: children most visited first (the default), or in the order the search added them."""
    limit: int = 20
    """Without --task: trees listed in the table (0: none)."""
    width: int | None = None
    """Columns per line; default: the terminal's, or 160 when the output is not a terminal."""
    plot: str | None = None
    """With --task: also draw the tree (down to --depth) into this image file (.png, .svg or .pdf)."""


def searched_iterations(run: str | Path) -> list[int]:
    """The iterations of run directory ``run`` that have written their search trees."""
    run = Path(run)
    found = []
    for d in run.iterdir() if run.is_dir() else ():
        m = _ITER.match(d.name)
        if m and d.name == f"iter_{int(m.group(1)):03d}" and (d / "trees.json").is_file():
            found.append(int(m.group(1)))
    return sorted(found)


def load_trees(run: str | Path, iteration: int | None = None):
    """The search trees of ``iteration`` (default: the latest searched) of run directory ``run``, as
    one :class:`search.Tree` batch (tree ``b``'s task in ``tree.meta[b]``); a :class:`UsageError`
    saying what is there when they are not."""
    return _load(run, iteration)[0]


def _load(run: str | Path, iteration: int | None):
    """:func:`load_trees`, and the iteration it loaded."""
    from engine.run_dir import read_json
    from search import trees_from_dicts

    path = Path(run)
    if not path.is_dir():
        raise UsageError(f"{run}: no such run directory; runs are under --runs-dir (default runs/)")
    done = searched_iterations(path)
    if not done:
        if (path / "iter_001" / "samples.jsonl").is_file():
            raise UsageError(f"{run}: a code run samples completions and keeps no search trees "
                             "(see iter_NNN/samples.jsonl)")
        what = "a run directory" if (path / "config.json").is_file() else "not a run directory (no config.json)"
        raise UsageError(f"{run}: no search trees yet ({what}); the first search writes iter_001/trees.json")
    if iteration is None:
        iteration = done[-1]
    elif iteration not in done:
        raise UsageError(f"{run}: iteration {iteration} has no search trees; "
                         f"iterations with trees: {', '.join(map(str, done))}")
    file = path / f"iter_{iteration:03d}" / "trees.json"
    data = read_json(file)
    if data == []:
        raise UsageError(f"{file} holds no trees (an empty list); restore it from a backup or search that "
                         "iteration again")
    try:
        return trees_from_dicts(data), iteration
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise UsageError(f"{file} does not hold search trees ({type(exc).__name__}: {exc}); "
                         "restore it from a backup or search that iteration again") from None


def _task_ids(tree) -> list[str]:
    return [str((m or {}).get("task_id", b)) for b, m in enumerate(tree.meta)]


def _find_task(tree, task: str, run, iteration: int) -> int:
    """Tree ``task`` (a task id or an index) of ``tree``, iteration ``iteration`` of ``run``."""
    from engine.run_dir import read_json

    ids = _task_ids(tree)
    if task in ids:
        return ids.index(task)
    if task.lstrip("-").isdigit():
        b = int(task)
        if 0 <= b < tree.batch_size:
            return b
        raise UsageError(f"--task {task}: out of range; iteration {iteration} has {tree.batch_size} trees "
                         f"(0..{tree.batch_size - 1})")
    elsewhere = []
    for it in searched_iterations(run):
        if it != iteration:
            data = read_json(Path(run) / f"iter_{it:03d}" / "trees.json")
            if any(isinstance(d, dict) and (d.get("meta") or {}).get("task_id") == task for d in data):
                elsewhere.append(it)
    if elsewhere:
        raise UsageError(f"--task {task}: not searched in iteration {iteration}; it was in iteration "
                         f"{', '.join(map(str, elsewhere))} (--iteration {elsewhere[0]})")
    close = difflib.get_close_matches(task, ids, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {ids[0]}"
    raise UsageError(f"--task {task}: no tree of iteration {iteration} has that task id or index{hint}")


_PLOT_FORMATS = (".png", ".svg", ".pdf")


def _check_plot_path(path: str) -> None:
    file = Path(path)
    if file.suffix.lower() not in _PLOT_FORMATS:
        raise UsageError(f"--plot {path}: give a file ending in {', '.join(_PLOT_FORMATS)}")
    if not file.parent.is_dir():
        raise UsageError(f"--plot {path}: no directory {file.parent}; create it first")


def _plot(tree, b: int, depth: int | None, path: str) -> None:
    """Draw tree ``b`` into ``path`` (written whole or not at all)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.run_dir import save_figure
    from search import plot_tree

    ax = plot_tree(tree, b, max_depth=depth)
    try:
        save_figure(ax.figure, path, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise UsageError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None
    finally:
        plt.close(ax.figure)


def load_pairs(run, iteration: int) -> tuple[list[dict] | None, str]:
    """The pairs extracted from ``iteration``'s trees (its pairs.jsonl; None before extraction or
    when unreadable) and what was wrong with the file ("" when nothing): records that are not
    pairs are left out, and a viewer shows the trees without marks rather than nothing."""
    from engine.run_dir import read_jsonl

    file = Path(run) / f"iter_{iteration:03d}" / "pairs.jsonl"
    if not file.is_file():
        return None, ""
    try:
        records = read_jsonl(file)
    except UsageError as exc:
        return None, f"no pair marks: {exc}"
    pairs = [r for r in records if isinstance(r, dict) and isinstance(r.get("node_id"), int)
             and all(isinstance(r.get(k), str) for k in ("task_id", "chosen", "rejected"))]
    bad = len(records) - len(pairs)
    return pairs, (f"{file}: {bad} of its {len(records)} lines are not pair records; left out" if bad else "")


def _pair_marks(tree, b: int, pairs: list[dict]) -> tuple[dict[int, str], int]:
    """Per child of tree ``b``: ``▲k`` / ``▼k``, chosen / rejected in k of ``pairs`` (the records
    of its task: at node ``node_id``, the first child with the chosen or rejected text, as
    extraction counts repeated texts); and the number of pairs found in the tree."""
    task = str((tree.meta[b] or {}).get("task_id"))
    counts: dict[int, list[int]] = {}
    found = 0
    for rec in pairs:
        if rec["task_id"] != task:
            continue
        node = rec["node_id"]
        if not 0 <= node < tree.node_count[b]:
            continue
        kids = {}
        for c in tree.children(b, node):
            kids.setdefault(tree.texts[b][c], c)
        w, l_ = kids.get(rec["chosen"]), kids.get(rec["rejected"])
        if w is None or l_ is None or w == l_:
            continue
        found += 1
        counts.setdefault(w, [0, 0])[0] += 1
        counts.setdefault(l_, [0, 0])[1] += 1
    return {c: " ".join(f"{sym}{n}" for sym, n in zip("▲▼", ab) if n) for c, ab in counts.items()}, found


def pair_notes(tree, b: int, pairs: list[dict] | None, found: int) -> tuple[str, str]:
    """What the pair marks of tree ``b`` mean (``found`` pairs extracted from it), and a note when
    several trees of the iteration searched its task; "" for each that does not apply."""
    if pairs is None:
        return "", ""
    legend = f"▲k / ▼k: chosen / rejected in k of the {found} pair{'' if found == 1 else 's'} extracted from this tree"
    ids = _task_ids(tree)
    shared = ids.count(ids[b])
    note = (f"{shared} trees of this iteration searched this task, and pairs.jsonl does not say which tree a pair came "
            "from: the marks count every pair of the task that fits this tree's nodes") if shared > 1 else ""
    return legend, note


def _run_min_q_gap(run) -> float:
    """The run's ``--min-q-gap`` (from its config.json; the default where it has none)."""
    import json

    from engine.config import TrainConfig

    try:
        value = json.loads((Path(run) / "config.json").read_text(encoding="utf-8")).get("min_q_gap")
    except (OSError, ValueError, AttributeError):
        value = None
    return float(value) if isinstance(value, (int, float)) else TrainConfig.min_q_gap


def _best_return(tree, b: int) -> float | None:
    """The highest return (sum of its steps' rewards) of a root-to-end path of tree ``b``."""
    ends = [int(i) for i in np.flatnonzero(tree.terminal[b, : tree.node_count[b]])]
    return max((float(tree.reward[b, tree.path(b, e)].sum()) for e in ends), default=None)


def show(args: ShowArgs, console) -> int:
    """Print what ``args`` asks for on ``console`` (a rich Console)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from search import format_tree

    for name in ("depth", "children", "limit", "iteration"):
        value = getattr(args, name)
        least = 1 if name in ("children", "iteration") else 0
        if value is not None and value < least:
            raise UsageError(f"--{name} must be at least {least}, got {value}")
    if args.width is not None and args.width < 40:
        raise UsageError(f"--width must be at least 40, got {args.width}")
    if args.task is None:
        given = [f"--{k}" for k in ("depth", "children", "order", "plot") if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only for the view of one tree; add --task ID, or drop "
                             f"{'it' if len(given) == 1 else 'them'}")
    if args.plot is not None:
        _check_plot_path(args.plot)
    if args.width is not None or not console.is_terminal:
        console = Console(width=args.width or 160, file=console.file)
    tree, iteration = _load(args.run, args.iteration)
    if args.task is not None:
        b = _find_task(tree, args.task, args.run, iteration)
        pairs, problem = load_pairs(args.run, iteration)
        marks, found = _pair_marks(tree, b, pairs) if pairs else ({}, 0)
        if problem:
            console.print(Text(f"note: {problem}"))
        legend, shared = pair_notes(tree, b, pairs, found)
        console.print(Text(f"iteration {iteration}" + (f"; {legend}" if legend else "")))
        if shared:
            console.print(Text(f"note: {shared}"))
        console.print(Text(format_tree(tree, b, max_depth=args.depth, max_children=args.children,
                                       order=args.order or "visits", width=console.width, marks=marks)),
                      soft_wrap=True)
        if args.plot is not None:
            _plot(tree, b, args.depth, args.plot)
            console.print(Text(f"wrote {args.plot}"))
        return 0
    pairs, problem = load_pairs(args.run, iteration)
    if problem:
        console.print(Text(f"note: {problem}"))
    console.print(Text(f"{args.run}, {summary_line(tree, args.run, iteration, pairs)}"))
    if args.limit == 0:
        return 0
    rows = tree_rows(tree, pairs, args.limit)
    table = Table(box=box.SIMPLE_HEAD)
    for name in rows[0] if rows else ():
        table.add_column(name, no_wrap=name != "ends with", overflow="fold",
                         justify="left" if name in ("task", "ends with") else "right")
    for row in rows:
        table.add_row(*(Text(str(v)) for v in row.values()))
    console.print(table)
    console.print(Text(f"{COLUMNS_NOTE} (marked * by --task)"))
    if tree.batch_size > args.limit:
        console.print(Text(f"… {tree.batch_size - args.limit} more (--limit N lists more); "
                           f"engine show {args.run} --task ID shows one tree node by node"))
    return 0


COLUMNS_NOTE = ("best: the highest return of a root-to-end path in the tree (- when none ends there); pairs: "
                "the task's records in pairs.jsonl (*: a task several trees searched, whose pairs they share); "
                "ends with: the last step of the most visited path")


def summary_line(tree, run, iteration: int, pairs: list[dict] | None) -> str:
    """One line on an iteration's trees: size and shape, pair yield at the run's ``--min-q-gap``,
    trees with a path of positive return, pairs extracted."""
    from search import tree_summary

    gap = _run_min_q_gap(run)
    s = tree_summary(tree, min_q_gap=gap)
    positive = sum(r is not None and r > 0 for r in (_best_return(tree, b) for b in range(tree.batch_size)))
    return (f"iteration {iteration}: {s['trees']} trees, {s['nodes']} nodes, deepest {s['max_depth']}, mean branching "
            f"{s['mean_branching']:.2f}, pair yield {s['pair_yield']:.1%} (Q gap >= {gap:g}); {positive} trees with "
            "a path of positive return" + ("" if pairs is None else f"; {len(pairs)} pairs extracted"))


def tree_rows(tree, pairs: list[dict] | None, limit: int) -> list[dict]:
    """The first ``limit`` trees' table rows (column name -> value; ``pairs`` only once the
    iteration's pairs are extracted)."""
    from search import principal_variation
    from search.view import one_line

    per_task: dict = {}
    for rec in pairs or ():
        per_task[rec["task_id"]] = per_task.get(rec["task_id"], 0) + 1
    ids = _task_ids(tree)
    trees_of = Counter(ids)
    rows = []
    for b in range(min(limit, tree.batch_size)):
        n = int(tree.node_count[b])
        pv = principal_variation(tree, b)
        task = ids[b]
        best = _best_return(tree, b)
        row = {"#": b, "task": one_line(task), "nodes": n, "depth": int(tree.depth[b, :n].max()),
               "N": int(tree.visits[b, 0]), "Q": f"{tree.q(b, 0):+.3f}", "best": "-" if best is None else f"{best:g}"}
        if pairs is not None:
            row["pairs"] = f"{per_task.get(task, 0)}{'*' if trees_of[task] > 1 else ''}"
        row["ends with"] = one_line(tree.texts[b][pv[-1]].strip()) if len(pv) > 1 else ""
        rows.append(row)
    return rows
