"""The iterative loop: search → extract records → train → evaluate → save, per iteration."""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from engine.config import TrainConfig, run_fields
from engine.errors import UsageError
from engine.evaluate import evaluate
from engine.report import finish_run, level_name
from engine.run_dir import (
    RunLock,
    disk_full_guard,
    file_sha256,
    read_json,
    read_jsonl,
    save_model_atomic,
    tree_checksums,
    write_json,
    write_jsonl,
)
from engine.run_inputs import (
    RUN_FORMAT,
    default_model,
    iteration_tasks,
    load_policy,
    prepare,
    task_sources,
)
from engine.search_runner import rollout_trajectories, run_search
from envs import MathEnv
from search import extract_pairs, extract_sibling_lists, extract_trajectories, tree_to_dict, trees_from_dicts
from trainers import DPOConfig, train_dpo, train_tpo

__all__ = ["STAGES", "correct_solutions", "mcnemar", "train"]


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


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


STAGES = ("search", "extract", "train", "eval")
"""The stages of one iteration, in order; iteration 0 has only ``eval`` (the start model)."""


def _failpoint(key: str) -> None:
    """Crash-safety testing: ``ENGINE_KILL_AT=<iteration>/<stage>`` makes the process SIGKILL itself
    in the middle of that stage (outputs partly written, completion not yet recorded)."""
    if os.environ.get("ENGINE_KILL_AT") == key:
        os.kill(os.getpid(), signal.SIGKILL)


class _Run:
    """A run directory being written: its state file, the loaded policy and the stage functions.
    Every stage reads its inputs from disk and writes its outputs atomically, so a resumed stage
    sees exactly what an uninterrupted one would."""

    def __init__(self, cfg: TrainConfig, run: Path, model_dir: str, state: dict, console: Console, policy=None,
                 sandbox=None):
        self.cfg, self.run, self.model_dir, self.state, self.console = cfg, run, model_dir, state, console
        self.heldout, _ = task_sources(cfg)
        self.env = MathEnv(max_steps=cfg.max_depth) if cfg.env == "math" else None
        self.sandbox = sandbox
        self.policy = policy
        # the iteration whose weights the policy holds (0: the start model; None: none or in training)
        self.loaded: int | None = 0 if policy is not None else None
        self._verified: set[str] = set()
        self._t0 = time.time()
        self._elapsed0 = float(state.get("elapsed_s", 0.0))

    def elapsed(self) -> float:
        return self._elapsed0 + time.time() - self._t0

    def it_dir(self, it: int) -> Path:
        d = self.run / f"iter_{it:03d}"
        d.mkdir(exist_ok=True)
        return d

    # state ---------------------------------------------------------------------------------------
    def save_state(self) -> None:
        write_json(self.run / "state.json", self.state)

    def complete(self, key: str, outputs: list[Path], info: dict | None = None) -> None:
        """Record stage ``key`` as done, with checksums of its (already durable) outputs."""
        self.state["checksums"].update(tree_checksums(self.run, outputs))
        if info:
            self.state["info"].setdefault(key.split("/")[0], {}).update(info)
        self.state["done"].append(key)
        self.state["running"] = None
        self.state["elapsed_s"] = self.elapsed()
        self.save_state()

    def needs(self, it: int, stage: str) -> list[str]:
        """The recorded files stage ``it/stage`` reads."""
        d = f"iter_{it:03d}"
        models = {"search": it - 1, "train": it - 1, "eval": it}
        lists = [f"{d}/lists.jsonl"] if self.cfg.trainer == "tpo" else []
        searched = [f"{d}/samples.jsonl"] if self.cfg.env == "code" else [f"{d}/trees.json", f"{d}/rollouts.jsonl"]
        files = {"extract": searched,
                 "train": [f"{d}/pairs.jsonl", f"{d}/sft.jsonl", *lists],
                 "eval": ["iter_000/heldout_correct.jsonl"] if it else []}.get(stage, [])
        k = models.get(stage, 0)
        return files + ([f"iter_{k:03d}/model"] if k > 0 else [])

    def verify(self, *rel: str) -> None:
        """Check that files recorded at stage completion are present and unchanged."""
        for prefix in rel:
            if prefix in self._verified:
                continue
            self._verified.add(prefix)
            recorded = {k: v for k, v in self.state["checksums"].items() if k == prefix or k.startswith(prefix + "/")}
            for name, digest in recorded.items():
                f = self.run / name
                if not f.is_file():
                    raise UsageError(f"{f} is missing, though the stage that wrote it completed; restore it from "
                                     "a backup or start a new run (nothing was changed)")
                if file_sha256(f) != digest:
                    raise UsageError(f"{f} is corrupt or truncated (its checksum differs from the one recorded when "
                                     "it was written); restore it from a backup or start a new run "
                                     "(nothing was changed)")

    # model ---------------------------------------------------------------------------------------
    def use_model(self, it: int) -> None:
        """Make the policy hold the weights after iteration ``it`` (0: the start model)."""
        if self.loaded == it:
            return
        if it == 0:
            path = self.model_dir
        else:
            self.verify(f"iter_{it:03d}/model")
            path = self.run / f"iter_{it:03d}" / "model"
        self.policy = load_policy(path, self.cfg.device)
        self.loaded = it

    # stages --------------------------------------------------------------------------------------
    def search(self, it: int) -> None:
        cfg = self.cfg
        self.use_model(it - 1)
        tasks = iteration_tasks(cfg, it)
        torch.manual_seed(cfg.seed * 1_000 + it)
        if cfg.env == "code":
            return self._search_code(it, tasks)
        t0 = time.time()
        record: list = []
        key = f"{it}/search"

        def progress(done, total, bar, job):
            bar.update(job, completed=done, total=total)
            if 0 < done < total:
                _failpoint(key)

        with _progress(self.console) as bar:
            job = bar.add_task(f"iter {it} search", total=cfg.simulations, info=f"{len(tasks)} trees")
            tree = run_search(self.policy, self.env, tasks, cfg, rollout_record=record,
                              progress=lambda d, n: progress(d, n, bar, job))
        search_s = time.time() - t0
        d = self.it_dir(it)
        write_json(d / "trees.json", [tree_to_dict(tree, b) for b in range(tree.batch_size)])  # meta: each task
        write_jsonl(d / "rollouts.jsonl", [{"tree": b, "node": n, "steps": steps, "reward": r}
                                           for b, n, steps, r in record])
        nodes = int(tree.node_count.sum())
        self.console.print(f"iteration {it}: searched {len(tasks)} tasks ({nodes} nodes) in {search_s:.0f}s")
        self.complete(key, [d / "trees.json", d / "rollouts.jsonl"], {"search_s": search_s, "num_nodes": nodes})

    def _search_code(self, it: int, tasks: list[dict]) -> None:
        from engine.code_task import sample_and_run

        t0, d = time.time(), self.it_dir(it)
        with self.console.status(f"iteration {it}: sampling {self.cfg.simulations} completions for {len(tasks)} "
                                 "tasks and running their pass matrices in the sandbox"):
            runs = sample_and_run(self.policy, tasks, self.cfg, self.sandbox)
        _failpoint(f"{it}/search")
        search_s = time.time() - t0
        write_jsonl(d / "samples.jsonl", runs)
        self.console.print(f"iteration {it}: sampled and ran {sum(len(r['codes']) for r in runs)} distinct bodies "
                           f"for {len(tasks)} tasks in {search_s:.0f}s")
        self.complete(f"{it}/search", [d / "samples.jsonl"], {"search_s": search_s})

    def _extract_code(self, it: int) -> None:
        from engine.code_task import pairs_from_runs

        d = self.it_dir(it)
        self.verify(*self.needs(it, "extract"))
        pairs, trajs, stats = pairs_from_runs(read_jsonl(d / "samples.jsonl"), it)
        write_jsonl(d / "pairs.jsonl", pairs)
        _failpoint(f"{it}/extract")
        write_jsonl(d / "trajectories.jsonl", trajs)
        write_jsonl(d / "sft.jsonl", [])  # the NLL term falls back to the chosen responses
        self.console.print(f"iteration {it}: {len(pairs)} pairs ({stats['own_tests']} own tests)")
        self.complete(f"{it}/extract", [d / "pairs.jsonl", d / "trajectories.jsonl", d / "sft.jsonl"],
                      {"num_pairs": len(pairs), "tasks_with_pair": stats["tasks_with_pair"],
                       "sample_pass_rate": (sum(t["correct"] for t in trajs) / len(trajs)) if trajs else 0.0})

    def extract(self, it: int) -> None:
        if self.cfg.env == "code":
            return self._extract_code(it)
        cfg, d = self.cfg, self.it_dir(it)
        self.verify(*self.needs(it, "extract"))
        dicts = read_json(d / "trees.json")
        tree = trees_from_dicts(dicts)
        prompts = [t["meta"]["prompt"] for t in dicts]
        ids = [t["meta"]["task_id"] for t in dicts]
        record = [(r["tree"], r["node"], r["steps"], r["reward"]) for r in read_jsonl(d / "rollouts.jsonl")]
        alpha = cfg.alpha if cfg.leaf_eval == "mix" else 1.0  # Agent Q's mix of Q and the critic's score
        pairs = extract_pairs(tree, prompts=prompts, task_ids=ids, iteration=it, min_q_gap=cfg.min_q_gap, alpha=alpha)
        trajs = [{**t, "source": "tree"} for t in extract_trajectories(tree, prompts=prompts, task_ids=ids,
                                                                        iteration=it)]
        trajs += rollout_trajectories(tree, record, prompts=prompts, task_ids=ids, iteration=it)
        sft_records = correct_solutions(trajs, per_task=cfg.sft_per_task)
        write_jsonl(d / "pairs.jsonl", pairs)
        _failpoint(f"{it}/extract")
        write_jsonl(d / "trajectories.jsonl", trajs)
        write_jsonl(d / "sft.jsonl", sft_records)
        outputs = [d / "pairs.jsonl", d / "trajectories.jsonl", d / "sft.jsonl"]
        if cfg.trainer == "tpo":
            write_jsonl(d / "lists.jsonl", extract_sibling_lists(tree, prompts=prompts, task_ids=ids, iteration=it,
                                                                  alpha=alpha))
            outputs.append(d / "lists.jsonl")
        solved = len({t["task_id"] for t in sft_records})
        self.console.print(f"iteration {it}: {len(pairs)} step pairs; {solved} tasks solved by some path")
        self.complete(f"{it}/extract", outputs,
                      {"num_pairs": len(pairs), "num_sft": len(sft_records), "tasks_solved": solved,
                       "path_correct_rate": (sum(t["correct"] for t in trajs) / len(trajs)) if trajs else 0.0})

    def train(self, it: int) -> None:
        cfg, d = self.cfg, self.it_dir(it)
        self.verify(*self.needs(it, "train"))
        pairs, sft_records = read_jsonl(d / "pairs.jsonl"), read_jsonl(d / "sft.jsonl")
        self.use_model(it - 1)
        key = f"{it}/train"
        t0 = time.time()
        dpo_cfg = DPOConfig(beta=cfg.beta, lr=cfg.lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                            sft_weight=cfg.sft_weight, loss=cfg.loss, label_smoothing=cfg.label_smoothing,
                            seed=cfg.seed * 1_000 + it, lora=cfg.lora, lora_r=cfg.lora_r,
                            lora_targets=tuple(cfg.lora_targets), metrics_path=str(d / "train_metrics.jsonl"))
        lists = read_jsonl(d / "lists.jsonl") if cfg.trainer == "tpo" else []
        train_fn, records = _trainer(cfg.trainer, pairs, lists)
        (d / "train_metrics.jsonl").unlink(missing_ok=True)

        def progress(step, total, m, bar, job):
            bar.update(job, completed=step, total=total, info=f"loss {m['loss']:.3f}")
            if step * 2 >= total:
                _failpoint(key)

        self.loaded = None  # the weights change from here on; only a completed stage names them
        with _progress(self.console) as bar:
            job = bar.add_task(f"iter {it} train ({cfg.trainer})", total=None, info="")
            summary = train_fn(self.policy.model, self.policy.tokenizer, records, dpo_cfg, sft_records=sft_records,
                               progress=lambda s, n, m: progress(s, n, m, bar, job))
        _failpoint(key)  # also when there was nothing to train on
        train_s = time.time() - t0
        write_json(d / "train.json", summary)
        save_model_atomic(self.policy.model, self.policy.tokenizer, d / "model")
        self.loaded = it
        outputs = [d / "train.json", d / "model"] + [f for f in [d / "train_metrics.jsonl"] if f.exists()]
        self.complete(key, outputs, {"train_s": train_s, "trainer": cfg.trainer, "num_train_records": len(records)})

    def eval(self, it: int) -> None:
        self.use_model(it)
        d = self.it_dir(it)
        t = time.time()
        with self.console.status(f"evaluating {len(self.heldout)} held-out problems (greedy)"):
            if self.cfg.env == "code":
                from engine.code_task import code_max_tokens, evaluate_pass_at_1

                ev = evaluate_pass_at_1(self.policy, self.heldout, self.sandbox, code_max_tokens(self.cfg))
                ev["heldout_accuracy"] = ev["heldout_pass@1"]
            else:
                ev = evaluate(self.policy, self.heldout, self.cfg.max_new_tokens)
        write_jsonl(d / "heldout_correct.jsonl",
                    [{"task_id": t["task_id"], "correct": c} for t, c in zip(self.heldout, ev["heldout_correct"])])
        _failpoint(f"{it}/eval")
        row = {"iteration": it, "heldout_accuracy": ev["heldout_accuracy"],
               **({"heldout_pass@1": ev["heldout_pass@1"]} if "heldout_pass@1" in ev else {}),
               "heldout_by_level": ev["heldout_by_level"], "eval_s": time.time() - t,
               **({"num_pairs": 0} if it == 0 else self.state["info"].get(str(it), {}))}
        if it:
            self.verify("iter_000/heldout_correct.jsonl")
            start = [r["correct"] for r in read_jsonl(self.run / "iter_000" / "heldout_correct.jsonl")]
            row.update(mcnemar(start, ev["heldout_correct"]))
        row["wall_s"] = self.elapsed()
        rows = self.metrics() + [row]
        write_jsonl(self.run / "metrics.jsonl", rows)
        levels = "  ".join(f"{level_name(k)}:{v:.1%}" for k, v in row["heldout_by_level"].items())
        what = "pass@1" if self.cfg.env == "code" else "accuracy"
        self.console.print(f"iteration {it}: held-out {what} {row['heldout_accuracy']:.1%}  ({levels})")
        self.complete(f"{it}/eval", [d / "heldout_correct.jsonl"])

    def metrics(self) -> list[dict]:
        """The metrics rows of completed evaluations (a row appended by a stage that was then killed
        before it completed is dropped)."""
        path = self.run / "metrics.jsonl"
        done = {int(k.split("/")[0]) for k in self.state["done"] if k.endswith("/eval")}
        return [r for r in (read_jsonl(path) if path.exists() else []) if r.get("iteration") in done]


def _schedule(iterations: int) -> list[tuple[int, str]]:
    return [(0, "eval")] + [(it, s) for it in range(1, iterations + 1) for s in STAGES]


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Run the whole loop for ``cfg`` (or continue the run ``cfg.resume``); returns the run directory."""
    console = console or Console()
    locks: list[RunLock] = []
    if cfg.resume is not None:
        run = Path(cfg.resume)
        locks.append(RunLock(run).acquire())
        state = read_json(run / "state.json")
        if not isinstance(state, dict) or not {"done", "checksums", "info"} <= set(state):
            raise UsageError(f"{run / 'state.json'} is not a run state file; restore it or start a new run")
    else:
        run = prepare(cfg)
        state = {"format": RUN_FORMAT, "done": [], "running": None, "elapsed_s": 0.0, "checksums": {}, "info": {}}
    sandbox = None
    try:
        if cfg.env == "code":
            from envs.sandbox import Sandbox

            sandbox = Sandbox()
            console.print(f"sandbox: {sandbox.describe()['isolation']} ({sandbox.describe()['cgroup']})")
        with disk_full_guard(run):
            return _train(cfg, run, state, locks, console, sandbox)
    finally:
        if sandbox is not None:
            sandbox.close()
        for lock in locks:
            lock.release()


def _train(cfg: TrainConfig, run: Path, state: dict, locks: list, console: Console, sandbox) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_dir = state.get("model_dir") or cfg.model or default_model(cfg, console, sandbox)
    policy = None
    if cfg.resume is None:
        policy = load_policy(model_dir, cfg.device)  # before anything is written: a bad model writes nothing
        run.mkdir(parents=True)
        locks.append(RunLock(run).acquire())
        state["model_dir"] = str(model_dir)
        try:
            extra = {"sandbox": sandbox.describe()} if sandbox is not None else {}
            write_json(run / "config.json", {"format": RUN_FORMAT, "model_dir": str(model_dir), **extra,
                                             **run_fields(cfg)})
            write_json(run / "state.json", state)
        except OSError:
            shutil.rmtree(run, ignore_errors=True)  # ours, and holds nothing yet
            raise
        console.print(f"run directory: {run}")
    r = _Run(cfg, run, model_dir, state, console, policy, sandbox)
    if cfg.resume is not None:
        todo = [(i, s) for i, s in _schedule(cfg.iterations) if f"{i}/{s}" not in state["done"]]
        if todo:
            r.verify(*r.needs(*todo[0]))  # before anything is written
        saved = read_json(run / "config.json")
        new = {**saved, **run_fields(cfg), "name": saved.get("name"), "runs_dir": saved.get("runs_dir")}
        if new != saved:
            write_json(run / "config.json", new)  # the safe changes accepted with --allow-config-change
        console.print(f"resuming {run}: {len(state['done'])} stages done"
                      + (f", next: {todo[0][0]}/{todo[0][1]}" if todo else ", nothing left to do"))
    for it, stage in _schedule(cfg.iterations):
        key = f"{it}/{stage}"
        if key in state["done"]:
            continue
        state["running"] = key
        r.save_state()
        getattr(r, stage)(it)
    rows = r.metrics()
    finish_run(run, rows, console, r.elapsed(), model_dir)
    return run


def _trainer(name: str, pairs: list[dict], lists: list[dict]):
    """(training function, its records) for ``--trainer``."""
    if name == "tpo":
        return train_tpo, lists
    if name == "step-dpo":
        return train_dpo, [p for p in pairs if p["rejected_q"] == 0.0]
    return train_dpo, pairs
