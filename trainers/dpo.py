"""DPO and step-DPO: the pair losses of :mod:`trainers.losses` on pair records.

DPO (Rafailov et al., 2023) on response-level pairs; step-DPO (Lai et al., 2024) is the same loss
on step-level pairs (``prefix`` = the steps already taken). An optional SFT term (RPO: Pang et al.,
2024, "Iterative Reasoning Preference Optimization", eq. 2; normalised per token) keeps the chosen
likelihood from falling, which is what DPO on small models otherwise does first. Per-record
``weight`` and ``label_smoothing`` fields (e.g. MCTS-DPO's visit-count smoothing) are honoured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from trainers.collate import pad_sequences, tokenize_groups
from trainers.loop import DPOConfig, PackedSlice, StepOutput, fit, make_encoder
from trainers.losses import LOSSES, preference_loss
from trainers.packing import Group

__all__ = ["DPOConfig", "sequence_logps", "train_dpo"]


def sequence_logps(model, contexts: Sequence[list[int]], continuations: Sequence[list[int]],
                   pad_id: int, device: torch.device) -> torch.Tensor:
    """Summed log-probability of each continuation given its context, shape ``[N]``, and the
    per-row continuation lengths ``[N]`` (plain padded rows, no packing)."""
    ids, attn, loss_mask = pad_sequences(contexts, continuations, pad_id)
    ids, attn, loss_mask = ids.to(device), attn.to(device), loss_mask.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = loss_mask[:, 1:]
    return (logp * mask).sum(-1), mask.sum(-1)


def _tokenize_sft(records: Sequence[dict], encode, max_length: int) -> tuple[list[Group], np.ndarray]:
    """Trajectory records (``prompt``, ``steps``) as one-continuation groups, skipping any that do
    not fit ``max_length``, and sampling probabilities that give every solution length (number of
    steps) the same total weight: correct solutions are far more common for short problems, and an
    unbalanced NLL term teaches the policy to stop early."""
    if not records:
        return [], np.zeros(0)
    ctx = encode([r["prompt"] for r in records])
    comp = encode(["".join(r["steps"]) for r in records])
    keep = [i for i, (c, k) in enumerate(zip(ctx, comp)) if k and c and len(c) + len(k) <= max_length]
    lengths = [len(records[i]["steps"]) for i in keep]
    counts = {n: lengths.count(n) for n in set(lengths)}
    weights = np.array([1.0 / counts[n] for n in lengths])
    return [Group(ctx[i], [comp[i]]) for i in keep], weights / max(weights.sum(), 1e-12)


def tokenize_records(tokenizer, contexts: list[str], continuations: list, sft_records: Sequence[dict],
                     config: DPOConfig, name: str, *, steps: bool = False):
    """The groups of a preference trainer (see :func:`tokenize_groups`), the indices of the records
    kept, the SFT groups and their sampling probabilities (when ``config.sft_weight > 0``), and the
    summary that starts its result: ``name`` (``pairs`` or ``lists``) counts the groups."""
    encode = make_encoder(tokenizer)
    groups, kept, stats = tokenize_groups(contexts, continuations, encode, config.max_length, steps=steps)
    sft, sft_p = _tokenize_sft(sft_records, encode, config.max_length) if config.sft_weight > 0 else ([], None)
    summary = {name: len(groups), "truncated": stats.truncated, "skipped": stats.skipped,
               "context_tokens": stats.context_tokens, "continuation_tokens": stats.continuation_tokens,
               "steps": []}
    return groups, kept, sft, sft_p, summary


def pair_objective(config: DPOConfig, weights: torch.Tensor, eps: torch.Tensor):
    """Per-record pair loss of ``config.loss`` times the record weights."""

    def objective(logp: torch.Tensor, ref_tok: torch.Tensor, part: PackedSlice) -> StepOutput:
        member = part.batch.member[: part.tokens]
        m = 2 * len(part.groups)
        pol = torch.zeros(m, dtype=logp.dtype, device=logp.device).index_add(0, member, logp)
        ref = torch.zeros(m, dtype=ref_tok.dtype, device=logp.device).index_add(0, member, ref_tok)
        pc, pr, rc, rr = pol[0::2], pol[1::2], ref[0::2], ref[1::2]
        idx = torch.as_tensor(part.index)
        losses = preference_loss(config.loss, pc, pr, rc, rr, beta=config.beta,
                                 label_smoothing=eps[idx].to(logp.device))
        return StepOutput(losses * weights[idx].to(logp.device), pc.detach(), pr.detach(), rc, rr)

    return objective


def train_dpo(
    model,
    tokenizer,
    records: Sequence[dict],
    config: DPOConfig = DPOConfig(),
    *,
    sft_records: Sequence[dict] = (),
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Fit ``model`` in place to pair records (``prompt``, ``prefix``, ``chosen``, ``rejected``,
    optional ``weight`` and ``label_smoothing``); returns a summary with per-step metrics (named as
    TRL names them: ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``) and how many records were cut or
    skipped to fit ``max_length``."""
    if config.beta <= 0 or not np.isfinite(config.beta):
        raise ValueError(f"beta must be a positive number, got {config.beta}")
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSSES)}")
    groups, kept, sft, sft_p, summary = tokenize_records(
        tokenizer, [r["prompt"] + r.get("prefix", "") for r in records],
        [(r["chosen"], r["rejected"]) for r in records], sft_records, config, "pairs")
    if not groups:
        return summary
    weights = torch.tensor([float(records[i].get("weight", 1.0)) for i in kept])
    eps = torch.tensor([float(records[i].get("label_smoothing", config.label_smoothing)) for i in kept])
    if bool(((eps < 0) | (eps >= 0.5)).any()):
        raise ValueError("every record's label_smoothing must be in [0, 0.5)")
    info = fit(model, tokenizer, groups, config, objective=pair_objective(config, weights, eps),
               sft_groups=sft, sft_p=sft_p, progress=progress)
    return {**summary, **info}
