"""TPO: preference-list training with a listwise ranking loss and adaptive step rewards.

Liao et al., 2025, "TPO: Aligning Large Language Models with Multi-branch & Multi-step Preference
Trees": each record is a list of continuations of one context with scores (siblings of a search
node ranked by Q, or whole paths ranked by reward). Each member's implicit reward is the sum of its
steps' log-ratios ``log pi - log pi_ref``, each weighted by TPO's adaptive step weight
(:func:`trainers.losses.step_weights`), times beta; the list is fitted with the LiPO-lambda
listwise loss (:func:`trainers.losses.listwise_loss`).

Implemented from the formulas. The authors' public code minimises ``-log sigmoid(beta * L_rank)``,
which *raises* the ranking loss, and scores token ``t`` with the logits at position ``t`` (no
shift); here the ranking loss itself is minimised and token ``t`` is scored by the logits at
``t - 1`` (tests check the sign).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from trainers.dpo import tokenize_records
from trainers.loop import DPOConfig, PackedSlice, StepOutput, fit
from trainers.losses import adaptive_step_rewards, listwise_loss

__all__ = ["train_tpo", "list_objective"]


def _segment_sums(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros((n,) + values.shape[1:], dtype=values.dtype, device=values.device).index_add(0, seg, values)


def list_objective(config: DPOConfig, scores: list[torch.Tensor], weights: torch.Tensor):
    """Per-list LiPO-lambda loss on adaptive step rewards, times the record weights."""

    def objective(logp: torch.Tensor, ref_tok: torch.Tensor, part: PackedSlice) -> StepOutput:
        batch = part.batch
        member, step = batch.member[: part.tokens], batch.step[: part.tokens]
        n_steps = int(step.max()) + 1 if len(step) else 1
        key = member * n_steps + step  # (member, step) cells
        m = int(member.max()) + 1
        ratio = _segment_sums(logp - ref_tok, key, m * n_steps).view(m, n_steps)
        counts = _segment_sums(torch.ones_like(logp), key, m * n_steps).view(m, n_steps)
        reps = None
        if part.hidden is not None and config.adaptive_steps:
            h = part.hidden[: part.tokens].float().detach()
            reps = (_segment_sums(h, key, m * n_steps) / counts.view(-1, 1).clamp(min=1)).view(m, n_steps, -1)
        pol = _segment_sums(logp, member, m)
        ref = _segment_sums(ref_tok, member, m)
        losses, first = [], 0
        tops, bottoms = [], []
        for g, i in zip(part.groups, part.index):
            k = len(g.continuations)
            rows = range(first, first + k)
            lr = [ratio[r, : int((counts[r] > 0).sum())] for r in rows]
            rp = [reps[r, : len(x)] for r, x in zip(rows, lr)] if reps is not None else None
            rewards = adaptive_step_rewards(lr, rp, beta=config.beta)
            losses.append(listwise_loss(rewards, scores[int(i)].to(logp.device)) * weights[int(i)])
            tops.append(first)
            bottoms.append(first + k - 1)
            first += k
        top, bottom = torch.tensor(tops, device=logp.device), torch.tensor(bottoms, device=logp.device)
        return StepOutput(torch.stack(losses), pol[top].detach(), pol[bottom].detach(), ref[top], ref[bottom])

    return objective


def train_tpo(
    model,
    tokenizer,
    records: Sequence[dict],
    config: DPOConfig = DPOConfig(),
    *,
    sft_records: Sequence[dict] = (),
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Fit ``model`` in place to list records (``prompt``, ``prefix``, ``responses``, ``scores``,
    optional ``weight``); members are ordered best first for the metrics (``rewards/chosen`` is the
    top member, ``rewards/rejected`` the bottom one). Steps are the lines of each response."""
    for r in records:
        if len(r["responses"]) != len(r["scores"]) or len(r["responses"]) < 2:
            raise ValueError("every list record needs at least 2 responses and one score per response "
                             f"(task {r.get('task_id', '?')}: {len(r['responses'])} responses, "
                             f"{len(r['scores'])} scores)")
    ordered = []
    for r in records:
        order = np.argsort(-np.asarray(r["scores"], dtype=float), kind="stable")
        ordered.append({**r, "responses": [r["responses"][i] for i in order],
                        "scores": [float(r["scores"][i]) for i in order]})
    groups, kept, sft, sft_p, summary = tokenize_records(
        tokenizer, [r["prompt"] + r.get("prefix", "") for r in ordered], [r["responses"] for r in ordered],
        sft_records, config, "lists", steps=True)
    if not groups:
        return summary
    scores = [torch.tensor(ordered[i]["scores"], dtype=torch.float32) for i in kept]
    weights = torch.tensor([float(ordered[i].get("weight", 1.0)) for i in kept])
    info = fit(model, tokenizer, groups, config, objective=list_objective(config, scores, weights),
               sft_groups=sft, sft_p=sft_p, want_hidden=config.adaptive_steps, progress=progress)
    return {**summary, **info}
