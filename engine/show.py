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


def _pairs(run, iteration: int) -> list[dict] | None:
    """The pairs extracted from ``iteration``'s trees (its pairs.jsonl), None before extraction."""
    from engine.run_dir import read_jsonl

    file = Path(run) / f"iter_{iteration:03d}" / "pairs.jsonl"
    return read_jsonl(file) if file.is_file() else None


def _pair_marks(tree, b: int, pairs: list[dict]) -> tuple[dict[int, str], int]:
    """Per child of tree ``b``: ``▲k`` / ``▼k``, chosen / rejected in k of ``pairs`` (the records
    of its task: at node ``node_id``, the first child with the chosen or rejected text, as
    extraction counts repeated texts); and the number of pairs found in the tree."""
    task = (tree.meta[b] or {}).get("task_id")
    counts: dict[int, list[int]] = {}
    found = 0
    for rec in pairs:
        if rec.get("task_id") != task or not isinstance(rec.get("node_id"), int):
            continue
        node = rec["node_id"]
        if not 0 <= node < tree.node_count[b]:
            continue
        kids = {}
        for c in tree.children(b, node):
            kids.setdefault(tree.texts[b][c], c)
        w, l_ = kids.get(rec.get("chosen")), kids.get(rec.get("rejected"))
        if w is None or l_ is None:
            continue
        found += 1
        counts.setdefault(w, [0, 0])[0] += 1
        counts.setdefault(l_, [0, 0])[1] += 1
    return {c: " ".join(f"{sym}{n}" for sym, n in zip("▲▼", ab) if n) for c, ab in counts.items()}, found


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

    from search import format_tree, principal_variation, tree_summary
    from search.view import one_line

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
        pairs = _pairs(args.run, iteration)
        marks, found = _pair_marks(tree, b, pairs) if pairs else ({}, 0)
        console.print(Text(f"iteration {iteration}" + ("" if pairs is None else
                                                      f"; ▲k / ▼k: chosen / rejected in k of the {found} "
                                                      f"pair{'' if found == 1 else 's'} extracted from this tree")))
        console.print(Text(format_tree(tree, b, max_depth=args.depth, max_children=args.children,
                                       order=args.order or "visits", width=console.width, marks=marks)),
                      soft_wrap=True)
        if args.plot is not None:
            _plot(tree, b, args.depth, args.plot)
            console.print(Text(f"wrote {args.plot}"))
        return 0
    pairs = _pairs(args.run, iteration)
    gap = _run_min_q_gap(args.run)
    s = tree_summary(tree, min_q_gap=gap)
    best = [_best_return(tree, b) for b in range(tree.batch_size)]
    console.print(Text(f"{args.run}, iteration {iteration}: {s['trees']} trees, {s['nodes']} nodes, deepest "
                       f"{s['max_depth']}, mean branching {s['mean_branching']:.2f}, pair yield "
                       f"{s['pair_yield']:.1%} (Q gap >= {gap:g}); {sum(r is not None and r > 0 for r in best)} trees "
                       "with a path of positive return" + ("" if pairs is None else f"; {len(pairs)} pairs extracted")))
    if args.limit == 0:
        return 0
    per_task: dict = {}
    for rec in pairs or ():
        per_task[rec.get("task_id")] = per_task.get(rec.get("task_id"), 0) + 1
    table = Table(box=box.SIMPLE_HEAD)
    for name in ("#", "task", "nodes", "depth", "N", "Q", "best", *(["pairs"] if pairs is not None else [])):
        table.add_column(name, no_wrap=True, justify="left" if name == "task" else "right")
    table.add_column("ends with", overflow="fold", min_width=8)
    for b in range(min(args.limit, tree.batch_size)):
        n = int(tree.node_count[b])
        pv = principal_variation(tree, b)
        end = one_line(tree.texts[b][pv[-1]].strip()) if len(pv) > 1 else ""
        table.add_row(str(b), Text(one_line(str((tree.meta[b] or {}).get("task_id", "")))), str(n),
                      str(int(tree.depth[b, :n].max())), str(int(tree.visits[b, 0])), f"{tree.q(b, 0):+.3f}",
                      "-" if best[b] is None else f"{best[b]:g}",
                      *([str(per_task.get((tree.meta[b] or {}).get("task_id"), 0))] if pairs is not None else []),
                      Text(end))
    console.print(table)
    console.print(Text("best: the highest return of a root-to-end path in the tree (- when none ends there); "
                       "ends with: the last step of the most visited path (marked * by --task)"))
    if tree.batch_size > args.limit:
        console.print(Text(f"… {tree.batch_size - args.limit} more (--limit N lists more); "
                           f"engine show {args.run} --task ID shows one tree node by node"))
    return 0
