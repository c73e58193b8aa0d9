"""Preference-training speed and memory: our DPO trainer against TRL's ``DPOTrainer``.

Both train on the same step-level pairs from a real MCTS run of the tiny default model (searched on
first use and cached under ``$ENGINE_CACHE``), with the same batch size and number of optimiser
steps, each arm in its own process (so peak RSS is its own), one after the other in this run:

* row ``tiny``: the 0.57M-parameter default model and 512 pairs; TRL with its default settings
  (reference model run every step, gradient checkpointing on) and with a precomputed reference and
  no checkpointing; ours with prefix sharing and without (unshared padded rows), in float32, and
  ours with prefix sharing under bf16 autocast (``ours-bf16``: the precision TRL's defaults use);
* row ``compute``: a ~25M-parameter Llama config with random weights, where the model's arithmetic
  dominates; each prompt is preceded by worked examples so the shared prefix is a few hundred
  tokens. Fewer pairs (``--compute-pairs``) keep the row short.

Before timing, the script checks that our DPO loss on TRL's first batch equals TRL's to 1e-4 (with
a reference model that differs from the policy, so the loss is not just log 2; in float32 on both
sides: TRL's default bf16 autocast, which its timed arms keep, moves its loss by ~1e-4). TRL appends EOS
to every continuation (one token more per continuation than ours; MEASUREMENTS.md explains why our
step continuations carry none).

    .venv/bin/python benchmarks/trainer_vs_trl.py [--pairs 512] [--batch-size 16] [--rows tiny,compute]

Needs the ``bench`` extra (``pip install -e '.[bench]'``: TRL). The last line of output is one JSON
object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLES = ("Worked examples:\n" + "".join(
    f"({a}+{b})*{c}\n{a}+{b}={a + b}\n{a + b}*{c}={(a + b) * c}\n#### {(a + b) * c}\n"
    for a, b, c in [(12, 7, 3), (45, 21, 2), (8, 9, 5), (33, 14, 4), (70, 6, 3), (27, 58, 2), (61, 19, 4),
                    (15, 22, 6), (40, 39, 2), (9, 88, 3), (51, 17, 5), (26, 30, 7)]) + "Now solve:\n")


def _cache_dir() -> Path:
    from engine.tiny_model import default_cache_dir

    return default_cache_dir()


def search_pairs(n: int, seed: int = 0) -> list[dict]:
    """``n`` step-level pairs from a real MCTS run of the default model (cached)."""
    path = _cache_dir() / "bench" / f"mcts-step-pairs-seed{seed}-{n}.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    from itertools import islice

    import torch

    from engine.config import TrainConfig
    from engine.run_inputs import load_policy
    from engine.search_runner import run_search
    from engine.tiny_model import BootstrapConfig, bootstrap
    from envs import MathEnv, arithmetic_tasks
    from search import extract_pairs

    cfg = TrainConfig(seed=seed)
    policy = load_policy(bootstrap(BootstrapConfig(seed=seed), log=print), "cpu")
    env = MathEnv(max_steps=cfg.max_depth)
    stream = arithmetic_tasks(seed + 1)
    pairs: list[dict] = []
    torch.manual_seed(seed)
    while len(pairs) < n:
        tasks = list(islice(stream, 256))
        t = time.time()
        tree = run_search(policy, env, tasks, cfg)
        pairs += extract_pairs(tree, prompts=[x["prompt"] for x in tasks], task_ids=[x["task_id"] for x in tasks],
                               iteration=1, min_q_gap=cfg.min_q_gap)
        print(f"searched {len(tasks)} tasks in {time.time() - t:.0f}s: {len(pairs)} pairs so far", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs[:n]))
    tmp.replace(path)
    return pairs[:n]


def load_model(row: str, seed: int = 0):
    """(model, tokenizer) for a row: the default model, or a random ~25M-parameter Llama."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.tiny_model import BootstrapConfig, bootstrap

    path = bootstrap(BootstrapConfig(seed=seed), log=lambda s: None)
    tok = AutoTokenizer.from_pretrained(path)
    if row == "tiny":
        return AutoModelForCausalLM.from_pretrained(path), tok
    # Saved once and loaded from disk, as a user's model would be (TRL's default reference model is
    # re-created from the policy's path).
    target = path.parent / "bench" / f"compute-llama-25m-{seed}"
    if not (target / "config.json").is_file():
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=None)
        tmp = target.with_name(target.name + ".tmp")
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.replace(target)
    return AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target)


def row_records(row: str, pairs: list[dict]) -> list[dict]:
    if row == "tiny":
        return pairs
    return [{**p, "prompt": EXAMPLES + p["prompt"]} for p in pairs]


def _peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM; ``ru_maxrss`` would carry the parent's peak
    across fork + exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trl_trainer(model, tok, records, batch_size: int, steps: int, out: str, *, tuned: bool, ref_model=None,
                 **extra):
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    data = Dataset.from_list([{"prompt": r["prompt"] + r["prefix"], "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in records])
    kw = dict(precompute_ref_log_probs=True, gradient_checkpointing=False) if tuned else {}
    kw.update(extra)
    args = TRLConfig(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps, report_to="none",
                     save_strategy="no", logging_steps=steps, use_cpu=True, seed=0, dataset_num_proc=None,
                     disable_tqdm=True, **kw)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)


def arm(name: str, row: str, n_pairs: int, batch_size: int, token_budget: int) -> dict:
    """One timed arm, in this process."""
    import torch

    from trainers import DPOConfig, train_dpo

    records = row_records(row, search_pairs(n_pairs))
    steps = len(records) // batch_size
    records = records[: steps * batch_size]
    model, tok = load_model(row)
    if name.startswith("trl"):
        with tempfile.TemporaryDirectory() as out:
            trainer = _trl_trainer(model, tok, records, batch_size, steps, out, tuned=name == "trl-tuned")
            t = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t
        info = {}
    else:
        cfg = DPOConfig(beta=0.1, lr=1e-6, epochs=1, batch_size=batch_size,
                        prefix_sharing="off" if name == "ours-unshared" else "on", token_budget=token_budget,
                        bf16=name == "ours-bf16")
        t = time.perf_counter()
        info = train_dpo(model, tok, records, cfg)
        wall = time.perf_counter() - t
        info = {"tokens_processed": info["tokens_processed"], "prefix_sharing": info["prefix_sharing"]}
    return {"arm": name, "row": row, "pairs": len(records), "steps": steps, "wall_s": wall,
            "pairs_per_s": len(records) / wall, "peak_rss_mb": _peak_rss_mb(), "threads": torch.get_num_threads(),
            **info}


def loss_check(row: str, n_pairs: int, batch_size: int) -> dict:
    """Our DPO loss vs TRL's ``compute_loss`` on TRL's first batch, reference != policy."""
    import copy

    import torch

    from trainers import dpo_loss
    from trainers.loop import reference_token_logps
    from trainers.packing import Group

    records = row_records(row, search_pairs(n_pairs))[:batch_size]
    model, tok = load_model(row)
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with tempfile.TemporaryDirectory() as out:
        trainer = _trl_trainer(model, tok, records, batch_size, 1, out, tuned=False, ref_model=ref, bf16=False)
        rows = [trainer.train_dataset[i] for i in range(batch_size)]
        batch = trainer.data_collator(rows)
        model.eval()
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(model, batch))
    groups = [Group(list(r["prompt_ids"]), [list(r["chosen_ids"]), list(r["rejected_ids"])]) for r in rows]

    def sums(m):
        return torch.stack([torch.stack([t[: len(g.continuations[0])].sum(), t[len(g.continuations[0]) :].sum()])
                            for t, g in zip(reference_token_logps(m, groups, pad_id=tok.pad_token_id, shared=True,
                                                                  token_budget=1024), groups)])

    pol, rf = sums(model), sums(ref)
    ours = float(dpo_loss(pol[:, 0], pol[:, 1], rf[:, 0], rf[:, 1], beta=trainer.beta).mean())
    return {"row": row, "trl_loss": trl_loss, "our_loss": ours, "abs_diff": abs(trl_loss - ours),
            "beta": trainer.beta}


def _run_child(kind: str, name: str, row: str, n_pairs: int, batch_size: int, threads: int, budget: int) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--arm", name, "--row", row, "--pairs", str(n_pairs),
           "--batch-size", str(batch_size), "--threads", str(threads), "--token-budget", str(budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} {name} {row} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio_stats(pairs: list[dict], tok) -> dict:
    enc = lambda ts: [len(x) for x in tok(ts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    ctx = sum(enc([p["prompt"] + p["prefix"] for p in pairs]))
    prefix_chars = sum(len(p["prefix"]) for p in pairs)
    cont = sum(enc([p["chosen"] for p in pairs])) + sum(enc([p["rejected"] for p in pairs]))
    return {"prefix_to_continuation_chars": prefix_chars / sum(len(p["chosen"]) + len(p["rejected"]) for p in pairs),
            "context_to_continuation_tokens": ctx / cont,
            "shared_share_of_unshared_tokens": 2 * ctx / (2 * ctx + cont),
            "tokens_unshared": 2 * ctx + cont, "tokens_shared": ctx + cont}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=512, help="pairs for the tiny row")
    ap.add_argument("--compute-pairs", type=int, default=64, help="pairs for the compute-bound row")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rows", default="tiny,compute")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default)")
    ap.add_argument("--token-budget", type=int, default=256, help="tokens per packed row (ours)")
    ap.add_argument("--child", choices=["arm", "check"])
    ap.add_argument("--arm", default="ours")
    ap.add_argument("--row", default="tiny")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child == "arm":
        print(json.dumps(arm(args.arm, args.row, args.pairs, args.batch_size, args.token_budget)))
        return
    if args.child == "check":
        print(json.dumps(loss_check(args.row, args.pairs, args.batch_size)))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    pairs = search_pairs(args.pairs)
    _, tok = load_model("tiny")
    headline: dict = {}
    for row in args.rows.split(","):
        n = args.pairs if row == "tiny" else args.compute_pairs
        stats = ratio_stats(row_records(row, pairs[:n]), tok)
        console.print(f"[bold]{row}[/]: {n} pairs from a real MCTS run; prefix : continuation = "
                      f"{stats['prefix_to_continuation_chars']:.2f} : 1 (characters, prefix steps only), "
                      f"context : continuations = {stats['context_to_continuation_tokens']:.2f} : 1 (tokens); "
                      f"the shared context is {stats['shared_share_of_unshared_tokens']:.0%} of the tokens an "
                      f"unshared layout processes ({stats['tokens_unshared']} vs {stats['tokens_shared']} shared)")
        with console.status(f"{row}: loss check against TRL"):
            check = _run_child("check", "-", row, n, args.batch_size, args.threads, args.token_budget)
        console.print(f"  first-batch DPO loss: TRL {check['trl_loss']:.6f}, ours {check['our_loss']:.6f} "
                      f"(|diff| {check['abs_diff']:.1e}, {'OK' if check['abs_diff'] <= 1e-4 else 'MISMATCH'})")
        results = {}
        for name in ("trl-defaults", "trl-tuned", "ours-unshared", "ours", "ours-bf16"):
            with console.status(f"{row}: {name}"):
                results[name] = r = _run_child("arm", name, row, n, args.batch_size, args.threads, args.token_budget)
            console.print(f"  {name:14s} {r['pairs_per_s']:8.1f} pairs/s  {r['wall_s']:6.1f} s  "
                          f"peak RSS {r['peak_rss_mb']:6.0f} MB")
        table = Table(title=f"{row}: {results['ours']['pairs']} pairs, batch {args.batch_size}, "
                            f"{results['ours']['steps']} optimiser steps")
        for col in ("arm", "pairs/s", "wall s", "peak RSS MB", "ours ×"):
            table.add_column(col, justify="right")
        for name, r in results.items():
            table.add_row(name, f"{r['pairs_per_s']:.1f}", f"{r['wall_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                          f"{results['ours']['pairs_per_s'] / r['pairs_per_s']:.2f}")
        console.print(table)
        ours, trl_d = results["ours"]["pairs_per_s"], results["trl-defaults"]["pairs_per_s"]
        headline[row] = {
            "pairs": results["ours"]["pairs"],
            "ours_pairs_per_s": round(results["ours"]["pairs_per_s"], 1),
            "trl_defaults_pairs_per_s": round(results["trl-defaults"]["pairs_per_s"], 1),
            "trl_tuned_pairs_per_s": round(results["trl-tuned"]["pairs_per_s"], 1),
            "ours_unshared_pairs_per_s": round(results["ours-unshared"]["pairs_per_s"], 1),
            "speedup_vs_trl_defaults": round(ours / trl_d, 2),
            "speedup_vs_trl_tuned": round(results["ours"]["pairs_per_s"] / results["trl-tuned"]["pairs_per_s"], 2),
            "speedup_from_prefix_sharing": round(results["ours"]["pairs_per_s"]
                                                 / results["ours-unshared"]["pairs_per_s"], 2),
            "ours_bf16_pairs_per_s": round(results["ours-bf16"]["pairs_per_s"], 1),
            "speedup_bf16_vs_trl_defaults": round(results["ours-bf16"]["pairs_per_s"] / trl_d, 2),
            "peak_rss_mb_ours": round(results["ours"]["peak_rss_mb"]),
            "peak_rss_mb_ours_bf16": round(results["ours-bf16"]["peak_rss_mb"]),
            "peak_rss_mb_trl_defaults": round(results["trl-defaults"]["peak_rss_mb"]),
            "loss_abs_diff_vs_trl": check["abs_diff"],
            "shared_prefix_share": round(stats["shared_share_of_unshared_tokens"], 3),
            "prefix_to_continuation_chars": round(stats["prefix_to_continuation_chars"], 2),
        }
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
