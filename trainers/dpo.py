"""DPO / step-DPO training: a plain torch loop over tokenised pairs.

Reference log-probabilities are computed once, before the first update, with the model as it is
at the start of the call; no second model is held in memory. An optional SFT term on the chosen
continuation (RPO: Pang et al., 2024, "Iterative Reasoning Preference Optimization", eq. 2; the
negative log-likelihood is normalised by the continuation's length) keeps the chosen likelihood
from falling, which is what DPO on small models otherwise does first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainers.collate import TokenizedPair, pad_sequences, tokenize_pairs
from trainers.losses import LOSSES, implicit_rewards, preference_loss

__all__ = ["DPOConfig", "sequence_logps", "train_dpo"]


@dataclass(frozen=True)
class DPOConfig:
    """Hyperparameters of one DPO training call."""

    beta: float = 0.1
    """Strength of the KL anchor to the reference policy."""
    lr: float = 1e-4
    """Peak AdamW learning rate: linear warmup, then linear decay to 0 (TRL's default schedule)."""
    epochs: int = 2
    """Passes over the pairs."""
    batch_size: int = 16
    """Pairs per optimiser step."""
    sft_weight: float = 0.0
    """Weight of the per-token NLL term (RPO); 0 disables it. It applies to ``sft_records`` when
    those are given (verified-correct whole solutions), else to the chosen continuations."""
    loss: str = "sigmoid"
    """Preference loss: sigmoid (DPO), ipo, hinge or robust (see trainers.losses)."""
    label_smoothing: float = 0.0
    """Label-flip rate epsilon for sigmoid (conservative DPO) and robust; 0 is plain DPO."""
    max_length: int = 512
    """Longest tokenised ``prompt + prefix + continuation``; the prefix is cut from the left."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    warmup_steps: int = 5
    """Linear warmup steps."""
    seed: int = 0
    """Seed for the order of the pairs."""


def sequence_logps(model, contexts: Sequence[list[int]], continuations: Sequence[list[int]],
                   pad_id: int, device: torch.device) -> torch.Tensor:
    """Summed log-probability of each continuation given its context, shape ``[N]``, and the
    per-row continuation lengths ``[N]``."""
    ids, attn, loss_mask = pad_sequences(contexts, continuations, pad_id)
    ids, attn, loss_mask = ids.to(device), attn.to(device), loss_mask.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = loss_mask[:, 1:]
    return (logp * mask).sum(-1), mask.sum(-1)


def _pair_logps(model, batch: list[TokenizedPair], pad_id: int, device):
    ctx = [p.context for p in batch] * 2
    cont = [p.chosen for p in batch] + [p.rejected for p in batch]
    logps, lengths = sequence_logps(model, ctx, cont, pad_id, device)
    n = len(batch)
    return logps[:n], logps[n:], lengths[:n]


def _tokenize_sft(records: Sequence[dict], encode, max_length: int):
    """Trajectory records (``prompt``, ``steps``) as (context ids, completion ids), skipping any
    that do not fit ``max_length``, and sampling probabilities that give every solution length
    (number of steps) the same total weight: correct solutions are far more common for short
    problems, and an unbalanced NLL term teaches the policy to stop early."""
    if not records:
        return [], np.zeros(0)
    ctx = encode([r["prompt"] for r in records])
    comp = encode(["".join(r["steps"]) for r in records])
    keep = [i for i, (c, k) in enumerate(zip(ctx, comp)) if k and c and len(c) + len(k) <= max_length]
    lengths = [len(records[i]["steps"]) for i in keep]
    counts = {n: lengths.count(n) for n in set(lengths)}
    weights = np.array([1.0 / counts[n] for n in lengths])
    return [(ctx[i], comp[i]) for i in keep], weights / max(weights.sum(), 1e-12)


def _lr_at(step: int, total: int, config: DPOConfig) -> float:
    """Linear warmup over ``warmup_steps``, then linear decay to zero at ``total``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * max(0.0, (total - step) / max(1, total - config.warmup_steps))


def train_dpo(
    model,
    tokenizer,
    records: Sequence[dict],
    config: DPOConfig = DPOConfig(),
    *,
    sft_records: Sequence[dict] = (),
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Fit ``model`` in place to pair records; returns a summary with per-step metrics (named as
    TRL names them: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``)."""
    if config.beta <= 0 or not math.isfinite(config.beta):
        raise ValueError(f"beta must be a positive number, got {config.beta}")
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSSES)}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(texts: list[str]) -> list[list[int]]:
        return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []

    pairs, stats = tokenize_pairs(records, encode, config.max_length)
    sft, sft_p = _tokenize_sft(sft_records, encode, config.max_length) if config.sft_weight > 0 else ([], None)
    summary = {"pairs": len(pairs), "truncated": stats.truncated, "skipped": stats.skipped,
               "context_tokens": stats.context_tokens, "continuation_tokens": stats.continuation_tokens,
               "steps": []}
    if not pairs:
        return summary

    # Reference log-probabilities, once, with the starting weights.
    model.eval()
    ref_c = torch.zeros(len(pairs))
    ref_r = torch.zeros(len(pairs))
    with torch.inference_mode():
        for s in range(0, len(pairs), config.batch_size * 4):
            c, r, _ = _pair_logps(model, pairs[s : s + config.batch_size * 4], pad_id, device)
            ref_c[s : s + len(c)] = c.cpu()
            ref_r[s : s + len(r)] = r.cpu()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                            weight_decay=0.0)
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total = steps_per_epoch * config.epochs
    step = 0
    model.train()
    for _ in range(config.epochs):
        order = rng.permutation(len(pairs))
        for s in range(0, len(pairs), config.batch_size):
            idx = order[s : s + config.batch_size]
            batch = [pairs[i] for i in idx]
            pc, pr, len_c = _pair_logps(model, batch, pad_id, device)
            rc, rr = ref_c[idx].to(device), ref_r[idx].to(device)
            losses = preference_loss(config.loss, pc, pr, rc, rr, beta=config.beta,
                                     label_smoothing=config.label_smoothing)
            loss = losses.mean()
            if config.sft_weight > 0 and sft:
                rows = [sft[int(i)] for i in rng.choice(len(sft), size=config.batch_size, p=sft_p)]
                logp, n_tok = sequence_logps(model, [r[0] for r in rows], [r[1] for r in rows], pad_id, device)
                loss = loss + config.sft_weight * (-logp.sum() / n_tok.sum().clamp(min=1))
            elif config.sft_weight > 0:
                loss = loss + config.sft_weight * (-pc.sum() / len_c.sum().clamp(min=1))
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            opt.step()
            step += 1
            with torch.no_grad():
                rw_c = implicit_rewards(pc, rc, config.beta)
                rw_r = implicit_rewards(pr, rr, config.beta)
                metrics = {
                    "step": step,
                    "loss": float(loss),
                    "rewards/chosen": float(rw_c.mean()),
                    "rewards/rejected": float(rw_r.mean()),
                    "rewards/margins": float((rw_c - rw_r).mean()),
                    "rewards/accuracies": float((rw_c > rw_r).float().mean()),
                    "logps/chosen": float(pc.mean()),
                    "logps/rejected": float(pr.mean()),
                }
            summary["steps"].append(metrics)
            if progress is not None:
                progress(step, total, metrics)
    model.eval()
    return summary
