"""``engine train --env code``: DSTC-style iterations on code tasks, and the tiny default code model.

Per iteration: sample ``--simulations`` completions (body, own asserts, ``# end``) per training task →
run every distinct body against every distinct own test in the sandbox (the pass matrix) → DSTC minimax
pairs with code and tests concatenated (``--code-pairs dstc``), or plain pairs from the task's ground-truth
tests (``ground-truth``; ``auto`` uses them when the task has any) → DPO with an NLL term on the chosen
responses → greedy pass@1 on held-out tasks (ground-truth tests) → save.

The default model is built by the same mechanism as the arithmetic one (:mod:`engine.tiny_model`): a
character-level Llama trained from scratch on procedural function-writing tasks (see
:func:`envs.code_tasks.code_task`), stopped early at ``target_pass`` so that there is room to improve,
cached under a key derived from its config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.tiny_model import (
    TinyModelConfig,
    build_cached,
    build_model,
    build_tokenizer,
    default_cache_dir,
    sft_batch,
    warmup_cosine_lr,
)
from envs import (
    code_tasks,
    ground_truth_pairs,
    heldout_code_tasks,
    load_code_tasks,
    minimax_pairs,
    split_completion,
    task_job,
)
from envs.sandbox import Sandbox

__all__ = ["CODE_CHARS", "CodeBootstrapConfig", "bootstrap_code", "code_max_tokens", "code_task_sources",
           "evaluate_pass_at_1", "pairs_from_runs", "sample_and_run"]

CODE_CHARS = "".join(ch for ch in string.printable if ch not in "\r\x0b\x0c\t")
"""Printable ASCII and newline: the code model's characters."""
FORMAT_VERSION = 1
MIN_CODE_TOKENS = 160
END = "# end\n"


@dataclass(frozen=True)
class CodeBootstrapConfig(TinyModelConfig):
    """How the embedded default code model is built and trained."""

    max_steps: int = 2000
    """Upper bound on SFT steps (and the cosine schedule's length)."""
    eval_every: int = 200
    """Steps between quick greedy pass@1 evaluations."""
    target_pass: float = 0.4
    """Stop as soon as quick greedy pass@1 reaches this."""
    quick_eval_size: int = 64
    """Tasks in the quick evaluation (distinct from the held-out set)."""
    own_tests: int = 2
    """Assert lines written after the body in the training text (the model learns to test itself)."""


def _sft_text(task: dict, own_tests: int) -> str:
    return task["canonical_solution"] + "".join(t + "\n" for t in task["tests"][:own_tests]) + END


def evaluate_pass_at_1(policy, tasks: list[dict], sandbox: Sandbox, max_new_tokens: int) -> dict:
    """Greedy pass@1 on ``tasks`` against their ground-truth tests, overall and per family."""
    samples = policy.generate([t["prompt"] for t in tasks], temperature=0.0, max_new_tokens=max_new_tokens, stop=None)
    bodies = [split_completion(s[0].text)[0] for s in samples]
    results = sandbox.run_many([task_job(t, b) for t, b in zip(tasks, bodies)])
    correct = np.array([r.all_passed for r in results], float)
    levels = np.array([str(t.get("level", "")) for t in tasks])
    return {"heldout_pass@1": float(correct.mean()) if len(correct) else 0.0,
            "heldout_by_level": {lv: float(correct[levels == lv].mean()) for lv in np.unique(levels)},
            "heldout_correct": correct.astype(int).tolist()}


def _cache_key(config: CodeBootstrapConfig) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "chars": CODE_CHARS, **dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _train_code_model(config: CodeBootstrapConfig, out_dir: Path, sandbox: Sandbox, log: Callable[[str], None]):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.policy import TransformersPolicy

    t0 = time.time()
    tok = build_tokenizer(CODE_CHARS)
    model = build_model(config, len(tok), tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(config.seed)
    model.apply(model._init_weights)
    ids = {c: tok.convert_tokens_to_ids(c) for c in CODE_CHARS}
    held = {t["prompt"] for t in heldout_code_tasks(200)}
    quick_stream = code_tasks(config.seed + 7_000_001, exclude=held)
    quick = [next(quick_stream) for _ in range(config.quick_eval_size)]
    stream = code_tasks(config.seed * 1000 + 11, exclude=held | {t["prompt"] for t in quick})
    policy = TransformersPolicy(model, tok, batch_size=256)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1)

    acc, history, step = 0.0, [], 0
    with Progress(TextColumn("[bold]code bootstrap SFT"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn()) as bar:
        job = bar.add_task("sft", total=config.max_steps, info="")
        for step in range(1, config.max_steps + 1):
            model.train()
            batch = [next(stream) for _ in range(config.batch_size)]
            x, mask, y = sft_batch([(t["prompt"], _sft_text(t, config.own_tests)) for t in batch], ids,
                                   tok.eos_token_id, tok.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(config, step - 1)
            loss = model(input_ids=x, attention_mask=mask, labels=y).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % config.eval_every == 0:
                acc = evaluate_pass_at_1(policy, quick, sandbox, MIN_CODE_TOKENS)["heldout_pass@1"]
                history.append({"step": step, "loss": loss.item(), "quick_pass@1": acc})
                bar.console.print(f"  step {step}: loss {loss.item():.3f}, quick greedy pass@1 {acc:.1%} "
                                  f"({time.time() - t0:.0f}s)")
            bar.update(job, completed=step, info=f"loss {loss.item():.3f}  quick pass@1 {acc:.0%}")
            if step % config.eval_every == 0 and acc >= config.target_pass:
                break
    summary = {"steps": step, "quick_pass@1": acc, "parameters": sum(p.numel() for p in model.parameters()),
               "wall_s": time.time() - t0, "config": dataclasses.asdict(config), "history": history}
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "bootstrap.json").write_text(json.dumps(summary, indent=2))
    log(f"trained {summary['parameters'] / 1e6:.2f}M parameters for {step} steps in {summary['wall_s']:.0f}s; "
        f"quick greedy pass@1 {acc:.1%}")


def bootstrap_code(config: CodeBootstrapConfig = CodeBootstrapConfig(), cache_dir: Path | None = None,
                   sandbox: Sandbox | None = None, log: Callable[[str], None] = print) -> Path:
    """The directory of the trained default code model for ``config``, training it if not cached."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    return build_cached(cache_dir / f"tiny-code-{_cache_key(config)}",
                        lambda out: _train_code_model(config, out, sandbox or Sandbox(), log),
                        what="default code model", log=log)


def code_task_sources(cfg):
    """(held-out tasks, iterator over training tasks) for ``--env code``."""
    if cfg.task_file is None:
        heldout = heldout_code_tasks(min(cfg.heldout_size, 200))
        return heldout, code_tasks(cfg.seed + 1, exclude=frozenset(t["prompt"] for t in heldout))
    tasks = load_code_tasks(cfg.task_file)
    order = np.random.default_rng(0).permutation(len(tasks))
    n_held = min(cfg.heldout_size, len(tasks) // 2)
    heldout, train = [tasks[i] for i in order[:n_held]], [tasks[i] for i in order[n_held:]]

    def cycle():
        rng = np.random.default_rng(cfg.seed + 1)
        while True:
            yield from (train[i] for i in rng.permutation(len(train)))

    return heldout, cycle()


def code_max_tokens(cfg) -> int:
    return max(cfg.max_new_tokens, MIN_CODE_TOKENS)


def sample_and_run(policy, tasks: list[dict], cfg, sandbox: Sandbox) -> list[dict]:
    """The search stage of ``--env code``: ``--simulations`` sampled completions per task, split into
    body and own tests; every distinct body run in the sandbox against every distinct own test (the
    pass matrix), or against the task's ground-truth tests. One JSON-able record per task."""
    samples = policy.generate([t["prompt"] for t in tasks], num_samples=cfg.simulations, temperature=cfg.temperature,
                              max_new_tokens=code_max_tokens(cfg), stop=None)
    jobs, out = [], []
    for task, group in zip(tasks, samples):
        parsed = [split_completion(s.text) for s in group]
        codes = list(dict.fromkeys(body for body, _, _ in parsed if body.strip()))
        tests = list(dict.fromkeys(t for _, ts, _ in parsed for t in ts))
        use_gt = bool(cfg.code_pairs == "ground-truth" or (cfg.code_pairs == "auto" and task["tests"]))
        for c in codes:
            if use_gt:
                jobs.append(task_job(task, c))
            elif tests:
                jobs.append(task_job(task, c, tests))
        out.append({"task": task, "codes": codes, "tests": tests, "ground_truth": use_gt})
    results, pos = sandbox.run_many(jobs), 0
    for rec in out:
        n = len(rec["codes"]) if (rec["ground_truth"] or rec["tests"]) else 0
        res, pos = results[pos: pos + n], pos + n
        rec["passed"] = [list(map(bool, r.passed)) for r in res]
        rec["all_passed"] = [bool(r.all_passed) for r in res]
    return out


def pairs_from_runs(runs: list[dict], iteration: int) -> tuple[list[dict], list[dict], dict]:
    """The extract stage of ``--env code``: DSTC minimax pairs (or ground-truth pairs) and the sampled
    solutions as trajectories, from :func:`sample_and_run` records."""
    pairs, trajs = [], []
    stats = {"tasks_with_pair": 0, "own_tests": 0}
    for rec in runs:
        task, codes, tests = rec["task"], rec["codes"], rec["tests"]
        if rec["ground_truth"]:
            new = ground_truth_pairs(task, codes, rec["all_passed"], iteration=iteration)
        else:
            matrix = np.array(rec["passed"], dtype=bool).reshape(len(rec["passed"]), len(tests))
            new = minimax_pairs(task, codes, tests, matrix, iteration=iteration)
        stats["own_tests"] += len(tests)
        stats["tasks_with_pair"] += bool(new)
        pairs += new
        trajs += [{"prompt": task["prompt"], "steps": [c], "reward": float(ok), "correct": ok,
                   "task_id": task.get("task_id", ""), "iteration": iteration, "source": "sample"}
                  for c, ok in zip(codes, rec["all_passed"])]
    return pairs, trajs, stats
