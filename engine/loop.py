"""The iterative loop: search → extract records → train → evaluate → save, per iteration."""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from engine.config import TrainConfig
from engine.errors import UsageError
from engine.evaluate import evaluate
from engine.run_dir import append_jsonl, save_model_atomic, write_json, write_jsonl
from engine.search_runner import rollout_trajectories, run_search
from envs import MathEnv, TaskFileError, arithmetic_tasks, heldout_arithmetic_tasks, load_tasks
from search import extract_pairs, extract_sibling_lists, extract_trajectories, tree_to_dict
from trainers import DPOConfig, train_dpo, train_tpo

__all__ = ["correct_solutions", "load_policy", "mcnemar", "prepare", "train"]

RUN_FORMAT = 1


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


def load_policy(model_dir: str | Path, device: str, batch_size: int = 256):
    """Load a local causal LM and its tokenizer; :class:`UsageError` when the directory is not one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engine.policy import TransformersPolicy

    path = Path(model_dir)
    if not path.is_dir():
        raise UsageError(f"--model {model_dir}: no such directory; give a local transformers model "
                         "directory (omit --model to use the embedded default)")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: no config.json there, so it is not a transformers model "
                         "directory; point at the folder written by save_pretrained")
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)  # fails fast on a non-model config
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model {model_dir}: cannot be loaded as a causal LM with its tokenizer "
                         f"({first}); it needs config.json, weights and tokenizer files") from None
    tokenizer.padding_side = "left"
    return TransformersPolicy(model, tokenizer, device=device, batch_size=batch_size)


def prepare(cfg: TrainConfig) -> Path:
    """Check everything that can be checked before anything is written; the run directory path."""
    runs = Path(cfg.runs_dir)
    probe = runs
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--runs-dir {cfg.runs_dir}: {probe} is not a directory; choose another path")
    if not _can_write(probe):
        raise UsageError(f"--runs-dir {cfg.runs_dir}: not writable ({probe} refuses new files); "
                         "choose a directory you can write to")
    name = cfg.name or f"{cfg.env}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = runs / name
    if run.exists():
        raise UsageError(f"run directory {run} already exists; choose another --name "
                         "(or delete the old run if you no longer need it)")
    if cfg.model is not None:
        mp = Path(cfg.model)
        if not mp.is_dir() or not (mp / "config.json").is_file():
            raise UsageError(f"--model {cfg.model}: not a transformers model directory (no config.json); "
                             "give the folder written by save_pretrained, or omit --model")
    if cfg.task_file is not None:
        try:
            load_tasks(cfg.task_file)
        except TaskFileError as exc:
            raise UsageError(f"--task-file: {exc}") from None
    return run


def mcnemar(before: list[int], after: list[int]) -> dict:
    """Problems gained and lost between two evaluations of the same held-out set, with the exact
    two-sided McNemar p-value (a binomial test on the discordant problems)."""
    gained = sum(1 for a, b in zip(before, after) if b and not a)
    lost = sum(1 for a, b in zip(before, after) if a and not b)
    n, k = gained + lost, min(gained, lost)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"gained_vs_start": gained, "lost_vs_start": lost, "mcnemar_p": p}


def correct_solutions(trajectories: list[dict], per_task: int) -> list[dict]:
    """Distinct verified-correct trajectories, at most ``per_task`` per task (so that easy tasks,
    solved by every rollout, do not dominate the SFT term)."""
    seen: set[tuple[str, str]] = set()
    count: dict[str, int] = {}
    out = []
    for t in trajectories:
        key = (t["task_id"], "".join(t["steps"]))
        if not t["correct"] or key in seen or count.get(t["task_id"], 0) >= per_task:
            continue
        seen.add(key)
        count[t["task_id"]] = count.get(t["task_id"], 0) + 1
        out.append(t)
    return out


def _can_write(directory: Path) -> bool:
    """Whether a file can be created in ``directory`` (tried for real: root passes ``os.access``
    checks even where the filesystem refuses)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".engine-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _task_sources(cfg: TrainConfig):
    """(held-out tasks, iterator over training tasks)."""
    if cfg.task_file is None:
        heldout = heldout_arithmetic_tasks(cfg.heldout_size)
        exclude = frozenset(t["prompt"] for t in heldout)
        return heldout, arithmetic_tasks(cfg.seed + 1, exclude=exclude)
    tasks = load_tasks(cfg.task_file)
    order = np.random.default_rng(0).permutation(len(tasks))
    n_held = min(cfg.heldout_size, len(tasks) // 2)
    heldout = [tasks[i] for i in order[:n_held]]
    train = [tasks[i] for i in order[n_held:]]

    def cycle():
        rng = np.random.default_rng(cfg.seed + 1)
        while True:
            for i in rng.permutation(len(train)):
                yield train[i]

    return heldout, cycle()


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Run the whole loop for ``cfg``; returns the run directory."""
    from engine.tiny_model import BootstrapConfig, bootstrap

    console = console or Console()
    run = prepare(cfg)
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = cfg.model or str(bootstrap(BootstrapConfig(seed=cfg.seed), log=console.print))
    policy = load_policy(model_dir, cfg.device)
    heldout, train_stream = _task_sources(cfg)
    env = MathEnv(max_steps=cfg.max_depth)

    run.mkdir(parents=True)
    write_json(run / "config.json", {"format": RUN_FORMAT, "model_dir": str(model_dir),
                                     **dataclasses.asdict(cfg)})
    console.print(f"run directory: {run}")
    metrics_path = run / "metrics.jsonl"
    rows: list[dict] = []
    correct: list[list[int]] = []

    def log_eval(iteration: int, extra: dict) -> None:
        t = time.time()
        with console.status(f"evaluating {len(heldout)} held-out problems (greedy)"):
            ev = evaluate(policy, heldout, cfg.max_new_tokens)
        row = {"iteration": iteration, "heldout_accuracy": ev["heldout_accuracy"],
               "heldout_by_level": ev["heldout_by_level"], "eval_s": time.time() - t, **extra,
               "wall_s": time.time() - t_start}
        it_dir = run / f"iter_{iteration:03d}"
        it_dir.mkdir(exist_ok=True)
        write_jsonl(it_dir / "heldout_correct.jsonl",
                    [{"task_id": t["task_id"], "correct": c} for t, c in zip(heldout, ev["heldout_correct"])])
        correct.append(ev["heldout_correct"])
        if iteration:
            row.update(mcnemar(correct[0], correct[-1]))
        append_jsonl(metrics_path, row)
        rows.append(row)
        levels = "  ".join(f"L{k}:{v:.1%}" for k, v in row["heldout_by_level"].items())
        console.print(f"iteration {iteration}: held-out accuracy {row['heldout_accuracy']:.1%}  ({levels})")

    log_eval(0, {"num_pairs": 0})
    for it in range(1, cfg.iterations + 1):
        it_dir = run / f"iter_{it:03d}"
        it_dir.mkdir(exist_ok=True)
        tasks = list(islice(train_stream, cfg.tasks_per_iteration))
        prompts = [t["prompt"] for t in tasks]
        ids = [t["task_id"] for t in tasks]
        torch.manual_seed(cfg.seed * 1_000 + it)
        t0 = time.time()
        record: list = []
        with _progress(console) as bar:
            job = bar.add_task(f"iter {it} search", total=cfg.simulations, info=f"{len(tasks)} trees")
            tree = run_search(policy, env, tasks, cfg, rollout_record=record,
                              progress=lambda d, n, bar=bar, job=job: bar.update(job, completed=d, total=n))
        search_s = time.time() - t0
        pairs = extract_pairs(tree, prompts=prompts, task_ids=ids, iteration=it, min_q_gap=cfg.min_q_gap)
        trajs = [{**t, "source": "tree"} for t in extract_trajectories(tree, prompts=prompts, task_ids=ids,
                                                                        iteration=it)]
        trajs += rollout_trajectories(tree, record, prompts=prompts, task_ids=ids, iteration=it)
        sft_records = correct_solutions(trajs, per_task=cfg.sft_per_task)
        write_jsonl(it_dir / "pairs.jsonl", pairs)
        lists = []
        if cfg.trainer == "tpo":
            lists = extract_sibling_lists(tree, prompts=prompts, task_ids=ids, iteration=it)
            write_jsonl(it_dir / "lists.jsonl", lists)
        write_jsonl(it_dir / "trajectories.jsonl", trajs)
        write_json(it_dir / "trees.json", [tree_to_dict(tree, b, meta={"task_id": ids[b], "prompt": prompts[b]})
                                           for b in range(tree.batch_size)])
        nodes = int(tree.node_count.sum())
        solved = len({t["task_id"] for t in sft_records})
        console.print(f"iteration {it}: searched {len(tasks)} tasks ({nodes} nodes) in {search_s:.0f}s; "
                      f"{len(pairs)} step pairs; {solved} tasks solved by some path")
        t0 = time.time()
        dpo_cfg = DPOConfig(beta=cfg.beta, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                            sft_weight=cfg.sft_weight, loss=cfg.loss, label_smoothing=cfg.label_smoothing,
                            seed=cfg.seed * 1_000 + it, lora=cfg.lora, lora_r=cfg.lora_r,
                            lora_targets=tuple(cfg.lora_targets), metrics_path=str(it_dir / "train_metrics.jsonl"))
        train_fn, records = _trainer(cfg.trainer, pairs, lists)
        (it_dir / "train_metrics.jsonl").unlink(missing_ok=True)
        with _progress(console) as bar:
            job = bar.add_task(f"iter {it} train ({cfg.trainer})", total=None, info="")
            summary = train_fn(policy.model, policy.tokenizer, records, dpo_cfg, sft_records=sft_records,
                               progress=lambda s, n, m, bar=bar, job=job: bar.update(job, completed=s, total=n,
                                                                   info=f"loss {m['loss']:.3f}"))
        train_s = time.time() - t0
        write_json(it_dir / "train.json", summary)
        save_model_atomic(policy.model, policy.tokenizer, it_dir / "model")
        log_eval(it, {"num_pairs": len(pairs), "trainer": cfg.trainer, "num_train_records": len(records),
                      "num_nodes": nodes, "search_s": search_s, "train_s": train_s,
                      "num_sft": len(sft_records), "tasks_solved": solved,
                      "path_correct_rate": (sum(t["correct"] for t in trajs) / len(trajs)) if trajs else 0.0})

    _finish(run, rows, console, time.time() - t_start, model_dir)
    return run


def _trainer(name: str, pairs: list[dict], lists: list[dict]):
    """(training function, its records) for ``--trainer``."""
    if name == "tpo":
        return train_tpo, lists
    if name == "step-dpo":
        return train_dpo, [p for p in pairs if p["rejected_q"] == 0.0]
    return train_dpo, pairs


def _finish(run: Path, rows: list[dict], console: Console, wall: float, model_dir: str) -> None:
    table = Table(title=f"held-out accuracy (greedy) — {run}")
    levels = sorted({k for r in rows for k in r["heldout_by_level"]}, key=int)
    for col in ["iteration", "accuracy", *[f"L{lv}" for lv in levels], "pairs", "wall s"]:
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


def _plot(run: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(its, [r["heldout_accuracy"] for r in rows], "o-", label="all")
    for lv in sorted({k for r in rows for k in r["heldout_by_level"]}, key=int):
        a.plot(its, [r["heldout_by_level"].get(lv) for r in rows], ".--", alpha=0.6, label=f"L{lv}")
    a.set_xticks(its)
    b.set_xticks(its)
    a.set_xlabel("iteration")
    a.set_ylabel("held-out accuracy")
    a.legend(fontsize=7)
    b.bar(its, [r["num_pairs"] for r in rows])
    b.set_xlabel("iteration")
    b.set_ylabel("pairs")
    fig.tight_layout()
    tmp = run / ".curves.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(run / "curves.png")
