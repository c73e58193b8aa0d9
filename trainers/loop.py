"""The training loop shared by DPO, step-DPO and TPO.

One call: tokenised groups in, the model updated in place. Reference log-probabilities are computed
once, before the first update, with the model as it is at the start of the call and in the same
packed layout as training; no second model is held in memory. Devices come from accelerate, so the
same loop runs on CPU, one GPU, or several processes under ``accelerate launch`` (DDP: each process
takes every ``world``-th record and its share of each batch; gradients are averaged).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from trainers.losses import implicit_rewards, nll_loss
from trainers.packing import Group, Scorer, pack_groups, prefix_sharing_matches

__all__ = ["DPOConfig", "StepOutput", "fit", "make_encoder"]


@dataclass(frozen=True)
class DPOConfig:
    """Hyperparameters of one training call (DPO, step-DPO or TPO)."""

    beta: float = 0.1
    """Strength of the KL anchor to the reference policy."""
    lr: float = 1e-4
    """Peak AdamW learning rate: linear warmup, then linear decay to 0 (TRL's default schedule)."""
    epochs: int = 2
    """Passes over the records."""
    batch_size: int = 16
    """Records (pairs or lists) per optimiser step, over all processes."""
    sft_weight: float = 0.0
    """Weight of the per-token NLL term (RPO); 0 disables it. It applies to ``sft_records`` when
    those are given (verified-correct whole solutions), else to the chosen (top-ranked) continuations."""
    loss: str = "sigmoid"
    """Pair loss: sigmoid (DPO), ipo, hinge or robust (see trainers.losses); TPO ignores it."""
    label_smoothing: float = 0.0
    """Label-flip rate epsilon for sigmoid (conservative DPO) and robust; 0 is plain DPO. A record's
    own ``label_smoothing`` field (visit-count smoothing from search) overrides it."""
    max_length: int = 512
    """Longest tokenised ``prompt + prefix + continuation``; the prefix is cut from the left."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    seed: int = 0
    """Seed for the order of the records."""
    prefix_sharing: Literal["auto", "on", "off"] = "auto"
    """Pack each group as [context | continuations...] with a 4-D mask ("on"), one padded row per
    continuation ("off"), or "on" when a probe on the first records gives the unshared log-probs."""
    token_budget: int = 256
    """Tokens per packed row (a longer group gets a row of its own); attention cost grows with the
    square of the row length, padding waste with its inverse."""
    grad_accum_steps: int = 1
    """Micro-batches per optimiser step (``batch_size`` is split among them)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time)."""
    bf16: bool = False
    """Run forward passes under bfloat16 autocast (weights, gradients and optimiser stay float32), as
    TRL's default ``bf16=True`` does; faster on CPUs and GPUs with bf16 units."""
    lora: bool = False
    """Train a LoRA adapter (peft) and merge it into the weights at the end, instead of all weights."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Names of the modules that get LoRA adapters."""
    adaptive_steps: bool = True
    """TPO: weight each step's log-ratio by TPO's adaptive step weights (uniform when False)."""
    metrics_path: str | None = None
    """JSONL file that receives one line of metrics per optimiser step (main process only)."""


@dataclass
class StepOutput:
    """What an objective returns for one micro-batch."""

    losses: torch.Tensor
    """Per-record losses ``[B]``."""
    chosen: torch.Tensor
    """Policy log-probabilities of each record's chosen (top-ranked) continuation ``[B]``."""
    rejected: torch.Tensor
    """... of its rejected (bottom-ranked) continuation ``[B]``."""
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


Objective = Callable[[torch.Tensor, torch.Tensor, "PackedSlice"], StepOutput]


@dataclass
class PackedSlice:
    """A micro-batch as the objective sees it."""

    groups: list[Group]
    batch: object
    """The :class:`trainers.packing.PackedBatch`."""
    hidden: torch.Tensor | None
    """Last-layer states at the records' continuation tokens ``[T, H]`` (when requested)."""
    index: np.ndarray
    """Indices of the records in the call's record list."""
    tokens: int
    """Continuation tokens of the records (the SFT rows' tokens follow them)."""


def make_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Texts to token ids without special tokens."""

    def encode(texts: list[str]) -> list[list[int]]:
        return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    return encode


def _lr_at(step: int, total: int, config: DPOConfig) -> float:
    """Linear warmup over ``warmup_steps``, then linear decay to zero at ``total``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * max(0.0, (total - step) / max(1, total - config.warmup_steps))


def _check(config: DPOConfig) -> None:
    if config.beta <= 0 or not math.isfinite(config.beta):
        raise ValueError(f"beta must be a positive number, got {config.beta}")
    if config.prefix_sharing not in ("auto", "on", "off"):
        raise ValueError(f"prefix_sharing must be 'auto', 'on' or 'off', got {config.prefix_sharing!r}")
    for name in ("batch_size", "epochs", "grad_accum_steps", "token_budget", "lora_r"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(config, name)}")
    if config.grad_accum_steps > config.batch_size:
        raise ValueError(f"grad_accum_steps ({config.grad_accum_steps}) cannot exceed batch_size ({config.batch_size})")


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.inference_mode()
def reference_token_logps(model, groups: Sequence[Group], *, pad_id: int, shared: bool, token_budget: int,
                          chunk: int = 64, bf16: bool = False) -> list[torch.Tensor]:
    """Per-token log-probabilities of every continuation of every group under ``model`` as it is
    now (CPU tensors, one per group, continuations concatenated in order)."""
    device = next(model.parameters()).device
    scorer = Scorer(model)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for s in range(0, len(groups), chunk):
        part = groups[s : s + chunk]
        batch = pack_groups(part, pad_id=pad_id, shared=shared, token_budget=token_budget).to(device)
        with _autocast(device, bf16):
            logp = scorer(batch)[0].float().cpu()
        sizes = [sum(map(len, g.continuations)) for g in part]
        out.extend(torch.split(logp, sizes))
    model.train(was_training)
    return out


def _wrap_lora(model, config: DPOConfig):
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in config.lora_targets if t not in names]
    if missing:
        raise ValueError(f"LoRA target modules {missing} are not in the model; choose among its module names "
                         f"(for example {sorted(n for n in names if n)[:12]})")
    cfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                     target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def fit(
    model,
    tokenizer,
    groups: Sequence[Group],
    config: DPOConfig,
    *,
    objective: Objective,
    sft_groups: Sequence[Group] = (),
    sft_p: np.ndarray | None = None,
    want_hidden: bool = False,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Train ``model`` in place on ``groups`` with ``objective``; the per-step metrics (TRL's
    names) and what the layout was."""
    from accelerate import Accelerator

    _check(config)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    acc = Accelerator(cpu=device.type == "cpu")
    world, rank = acc.num_processes, acc.process_index
    local = np.arange(rank, len(groups), world)
    info = {"steps": [], "processes": world}
    if not len(local):
        return info

    if config.prefix_sharing == "auto":
        shared = prefix_sharing_matches(model, [groups[i] for i in local[:4]], pad_id=pad_id)
    else:
        shared = config.prefix_sharing == "on"
    info["prefix_sharing"] = shared
    ref = {int(i): t for i, t in zip(local, reference_token_logps(
        model, [groups[i] for i in local], pad_id=pad_id, shared=shared, token_budget=config.token_budget,
        bf16=config.bf16))}

    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    net = _wrap_lora(model, config) if config.lora else model
    ckpt_on, ckpt_off = _checkpointing_switches(net)
    ckpt = config.gradient_checkpointing and ckpt_on is not None
    if config.gradient_checkpointing and not ckpt:
        raise ValueError("gradient_checkpointing: this model has no gradient checkpointing switch; "
                         "set gradient_checkpointing=False")
    if ckpt:
        ckpt_on()
    params = [p for p in net.parameters() if p.requires_grad]
    info["trainable_parameters"] = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scorer, opt = acc.prepare(Scorer(net), opt)
    device = acc.device

    rng = np.random.default_rng(config.seed)
    steps_per_epoch = math.ceil(len(groups) / config.batch_size)
    per_rank = math.ceil(config.batch_size / world)
    total = steps_per_epoch * config.epochs
    metrics_file = Path(config.metrics_path) if config.metrics_path and acc.is_main_process else None
    tokens_processed = 0
    step = 0
    net.train()
    try:
        for _ in range(config.epochs):
            order = local[rng.permutation(len(local))]
            for s in range(steps_per_epoch):
                if world == 1:
                    idx = order[s * config.batch_size : (s + 1) * config.batch_size]
                else:
                    idx = order[(s * per_rank + np.arange(per_rank)) % len(order)]
                sft_rows = []
                if config.sft_weight > 0 and len(sft_groups):
                    sft_rows = [sft_groups[int(i)] for i in rng.choice(len(sft_groups), size=len(idx), p=sft_p)]
                micro = [m for m in np.array_split(np.arange(len(idx)), config.grad_accum_steps) if len(m)]
                nll_norm = (sum(len(g.continuations[0]) for g in sft_rows) if sft_rows
                            else sum(len(groups[i].continuations[0]) for i in idx))
                outs, loss_total = [], 0.0
                for j, m in enumerate(micro):
                    part = [groups[i] for i in idx[m]]
                    extra = [sft_rows[k] for k in m] if sft_rows else []
                    batch = pack_groups(part + extra, pad_id=pad_id, shared=shared,
                                        token_budget=config.token_budget).to(device)
                    tokens_processed += batch.tokens
                    sync = acc.no_sync(scorer) if j < len(micro) - 1 else nullcontext()
                    with sync, _autocast(device, config.bf16):
                        logp, hidden = scorer(batch, hidden=want_hidden)
                        n_pref = sum(sum(map(len, g.continuations)) for g in part)
                        ref_tok = torch.cat([ref[int(i)] for i in idx[m]]).to(device)
                        out = objective(logp[:n_pref], ref_tok,
                                        PackedSlice(part, batch, hidden, idx[m], n_pref))
                        loss = out.losses.sum() / len(idx)
                        if config.sft_weight > 0:
                            nll_tok = logp[n_pref:] if extra else _first_member_tokens(logp, batch, part)
                            loss = loss + config.sft_weight * nll_loss(nll_tok) * nll_tok.numel() / max(nll_norm, 1)
                        acc.backward(loss)
                    loss_total += float(loss.detach())
                    outs.append(out)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, config)
                acc.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                metrics = _metrics(step, loss_total, outs, config.beta)
                info["steps"].append(metrics)
                if metrics_file is not None:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(metrics) + "\n")
                if progress is not None:
                    progress(step, total, metrics)
    finally:
        if ckpt:
            ckpt_off()
        if config.lora:
            net.merge_and_unload()
            for n, p in model.named_parameters():
                p.requires_grad_(grad_flags.get(n, True))
        model.eval()
    info["tokens_processed"] = tokens_processed
    return info


def _checkpointing_switches(model):
    """(enable, disable) for activation checkpointing (transformers >= 5 names first)."""
    for on, off in (("activation_checkpointing_enable", "activation_checkpointing_disable"),
                    ("gradient_checkpointing_enable", "gradient_checkpointing_disable")):
        if hasattr(model, on) and hasattr(model, off):
            return getattr(model, on), getattr(model, off)
    return None, None


def _first_member_tokens(logp: torch.Tensor, batch, part: list[Group]) -> torch.Tensor:
    """Token log-probs of each group's first continuation (chosen / top-ranked)."""
    pieces, start = [], 0
    for g in part:
        pieces.append(logp[start : start + len(g.continuations[0])])
        start += sum(map(len, g.continuations))
    return torch.cat(pieces)


def _metrics(step: int, loss: float, outs: list[StepOutput], beta: float) -> dict:
    with torch.no_grad():
        pc, pr = torch.cat([o.chosen for o in outs]), torch.cat([o.rejected for o in outs])
        rc, rr = torch.cat([o.ref_chosen for o in outs]), torch.cat([o.ref_rejected for o in outs])
        rw_c, rw_r = implicit_rewards(pc, rc, beta), implicit_rewards(pr, rr, beta)
        return {
            "step": step,
            "loss": loss,
            "rewards/chosen": float(rw_c.mean()),
            "rewards/rejected": float(rw_r.mean()),
            "rewards/margins": float((rw_c - rw_r).mean()),
            "rewards/accuracies": float((rw_c > rw_r).float().mean()),
            "logps/chosen": float(pc.mean()),
            "logps/rejected": float(pr.mean()),
        }
