"""The end of a run: the results table, ``summary.json`` and ``curves.png``."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from engine.run_dir import save_figure, write_json

__all__ = ["finish_run", "level_name"]


def _level_key(level: str):
    """Numeric levels in numeric order, then named ones (code task families) by name."""
    return (0, int(level), "") if level.isdigit() else (1, 0, level)


def level_name(level: str) -> str:
    return f"L{level}" if level.isdigit() else level


def finish_run(run: Path, rows: list[dict], console: Console, wall: float, model_dir: str) -> None:
    table = Table(title=f"held-out accuracy (greedy) — {run}")
    levels = sorted({k for r in rows for k in r["heldout_by_level"]}, key=_level_key)
    for col in ["iteration", "accuracy", *[level_name(lv) for lv in levels], "pairs", "wall s"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["iteration"]), f"{r['heldout_accuracy']:.1%}",
                      *[f"{r['heldout_by_level'].get(lv, float('nan')):.1%}" for lv in levels],
                      str(r["num_pairs"]), f"{r['wall_s']:.0f}")
    console.print(table)
    _plot(run, rows)
    write_json(run / "summary.json", {
        "iterations": len(rows) - 1, "wall_s": wall, "start_model": model_dir,
        "final_model": str(run / f"iter_{len(rows) - 1:03d}" / "model") if len(rows) > 1 else model_dir,
        "heldout_accuracy": [r["heldout_accuracy"] for r in rows],
        "gain": rows[-1]["heldout_accuracy"] - rows[0]["heldout_accuracy"],
        "gain_by_level": {lv: rows[-1]["heldout_by_level"][lv] - rows[0]["heldout_by_level"][lv]
                          for lv in rows[0]["heldout_by_level"]},
        **{k: rows[-1][k] for k in ("gained_vs_start", "lost_vs_start", "mcnemar_p") if k in rows[-1]},
    })
    console.print(f"wrote {run}/metrics.jsonl, curves.png, summary.json ({wall:.0f}s in all)")
    if any(run.glob("iter_*/trees.json")):
        console.print(f"look at the search trees: engine show {run}")


def _plot(run: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(its, [r["heldout_accuracy"] for r in rows], "o-", label="all")
    for lv in sorted({k for r in rows for k in r["heldout_by_level"]}, key=_level_key):
        a.plot(its, [r["heldout_by_level"].get(lv) for r in rows], ".--", alpha=0.6, label=level_name(lv))
    a.set_xticks(its)
    b.set_xticks(its)
    a.set_xlabel("iteration")
    a.set_ylabel("held-out accuracy")
    a.legend(fontsize=7)
    b.bar(its, [r["num_pairs"] for r in rows])
    b.set_xlabel("iteration")
    b.set_ylabel("pairs")
    fig.tight_layout()
    try:
        save_figure(fig, run / "curves.png", dpi=100)
    finally:
        plt.close(fig)
