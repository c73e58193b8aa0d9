"""Prefix-shared packing of preference groups, and their log-probabilities in one forward pass.

A group is one context (``prompt + prefix``) with its continuations (2 for a pair, n for a list).
Shared layout: each group occupies one segment of a row, ``[context | cont 1 | cont 2 | ...]``,
several groups per row up to a token budget. A 4-D additive attention mask lets each continuation
see the context and itself (causally) but not its siblings or other groups, and position ids restart
after the context, so every continuation is computed exactly as in its own row ``context + cont``
while the context is computed once. Unshared layout: one right-padded row per (group, continuation),
for models that cannot take a 4-D mask.

Works with the eager and sdpa attention implementations of transformers (both add the float mask to
the attention scores; ``masking_utils`` passes a 4-D mask through unchanged). Flash-attention
kernels ignore such masks; :func:`prefix_sharing_matches` detects that and training falls back to
the unshared layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Group", "PackedBatch", "Scorer", "member_sums", "pack_groups", "prefix_sharing_matches"]


@dataclass(frozen=True)
class Group:
    """One context and its continuations, as token ids; ``steps[i]`` holds the token length of each
    step of continuation ``i`` (one step covering it all when steps are not marked)."""

    context: list[int]
    continuations: list[list[int]]
    steps: list[list[int]] | None = None

    def step_lengths(self, i: int) -> list[int]:
        return self.steps[i] if self.steps is not None else [len(self.continuations[i])]


@dataclass
class PackedBatch:
    """Model inputs plus the indices that pick each continuation token's log-probability.

    ``T`` is the number of continuation tokens in the batch, ``M`` the number of continuations
    (members, in group order)."""

    input_ids: torch.Tensor
    """``[R, L]``."""
    position_ids: torch.Tensor
    """``[R, L]``."""
    attention_mask: torch.Tensor
    """``[R, 1, L, L]`` boolean (True: may attend) in the shared layout, ``[R, L]`` otherwise."""
    pred_row: torch.Tensor
    """``[T]`` row of the position whose logits predict each continuation token."""
    pred_col: torch.Tensor
    """``[T]`` column of that position (the previous token; the context's last token for the first)."""
    tok_col: torch.Tensor
    """``[T]`` column of the continuation token itself."""
    target: torch.Tensor
    """``[T]`` the continuation token ids."""
    member: torch.Tensor
    """``[T]`` index in ``0..M-1`` of the continuation each token belongs to."""
    step: torch.Tensor
    """``[T]`` index of the step (within its continuation) each token belongs to."""
    num_members: int
    shared: bool
    tokens: int
    """Non-padding tokens the model runs over."""

    def to(self, device) -> PackedBatch:
        for name in ("input_ids", "position_ids", "attention_mask", "pred_row", "pred_col", "tok_col", "target",
                     "member", "step"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def _first_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group indices into rows of at most ``budget`` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r in range(len(rows)):
            if lengths[i] <= room[r]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max(budget, lengths[i]) - lengths[i])
    return rows


def pack_groups(groups: Sequence[Group], *, pad_id: int, shared: bool = True, token_budget: int = 1024) -> PackedBatch:
    """Pack ``groups`` into model inputs; members are numbered in group order (group 0's
    continuations first)."""
    offsets, m = [], 0
    for g in groups:
        offsets.append(m)
        m += len(g.continuations)
    # Token lists per member, filled in any row order and concatenated in member order, so that the
    # tokens of group i always occupy one contiguous, layout-independent slice.
    per_member: list[tuple] = [None] * m

    def add(mi: int, r: int, pred: list[int], cols: list[int], cont: list[int], steps: list[int]) -> None:
        per_member[mi] = ([r] * len(cont), pred, cols, cont, [mi] * len(cont),
                          [s for s, length in enumerate(steps) for _ in range(length)])

    if shared:
        lengths = [len(g.context) + sum(map(len, g.continuations)) for g in groups]
        rows = _first_fit(lengths, token_budget)
        width = max(sum(lengths[i] for i in row) for row in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        seg = torch.full((len(rows), width), -1, dtype=torch.long)  # group segment id, -1 for padding
        sub = torch.zeros((len(rows), width), dtype=torch.long)  # 0: context, k: continuation k (1-based)
        for r, row in enumerate(rows):
            col = 0
            for gi in row:
                g = groups[gi]
                c = len(g.context)
                ids[r, col : col + c] = torch.tensor(g.context)
                pos[r, col : col + c] = torch.arange(c)
                seg[r, col : col + c] = gi
                last_ctx = col + c - 1
                col += c
                for k, cont in enumerate(g.continuations):
                    n = len(cont)
                    ids[r, col : col + n] = torch.tensor(cont)
                    pos[r, col : col + n] = torch.arange(c, c + n)
                    seg[r, col : col + n] = gi
                    sub[r, col : col + n] = k + 1
                    cols = list(range(col, col + n))
                    add(offsets[gi] + k, r, [last_ctx] + cols[:-1], cols, cont, g.step_lengths(k))
                    col += n
        idx = torch.arange(width)
        causal = idx[None, :, None] >= idx[None, None, :]
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        visible = (sub[:, None, :] == 0) | (sub[:, :, None] == sub[:, None, :])
        mask = ((same & causal & visible) | torch.eye(width, dtype=torch.bool)[None])[:, None]  # padding: itself
        attn, tokens = mask, int((seg >= 0).sum())
    else:
        seqs = [(g.context, cont, offsets[gi] + k, g.step_lengths(k))
                for gi, g in enumerate(groups) for k, cont in enumerate(g.continuations)]
        width = max(len(c) + len(k) for c, k, _, _ in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (ctx, cont, mi, steps) in enumerate(seqs):
            c, n = len(ctx), len(cont)
            ids[r, : c + n] = torch.tensor(ctx + cont)
            attn[r, : c + n] = 1
            add(mi, r, list(range(c - 1, c + n - 1)), list(range(c, c + n)), cont, steps)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        tokens = int(attn.sum())
    cat = [torch.tensor([v for pm in per_member for v in pm[j]], dtype=torch.long) for j in range(6)]
    return PackedBatch(ids, pos, attn, *cat, m, shared, tokens)


def _backbone_and_head(model):
    """(decoder stack, output projection) of a transformers causal LM, looking through a peft
    wrapper; ``(None, None)`` when the model does not expose them."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(inner, "base_model_prefix", "")
    backbone = getattr(inner, prefix, None) if prefix else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is inner:
        return None, None
    return backbone, head


class Scorer(nn.Module):
    """Per-token log-probabilities of packed continuations. Runs the decoder stack once and the
    output projection only at the positions that predict continuation tokens (the context's other
    positions never reach the vocabulary). A module, so DDP can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch, *, hidden: bool = False):
        """``(token_logps [T], token_hidden [T, H] or None)``; ``token_hidden`` is the last layer's
        state at each continuation token (for step representations)."""
        mask = batch.attention_mask
        if batch.shared:
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        backbone, head = _backbone_and_head(self.model)
        if backbone is not None:
            states = backbone(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                              use_cache=False).last_hidden_state
            logits = head(states[batch.pred_row, batch.pred_col]).float()
        else:
            out = self.model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                             use_cache=False, output_hidden_states=hidden)
            states = out.hidden_states[-1] if hidden else None
            logits = out.logits[batch.pred_row, batch.pred_col].float()
        logp = logits.log_softmax(-1).gather(-1, batch.target[:, None])[:, 0]
        return logp, (states[batch.pred_row, batch.tok_col] if hidden else None)


def member_sums(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Sum per continuation of per-token ``values`` ``[T]`` → ``[M]``."""
    return torch.zeros(batch.num_members, dtype=values.dtype, device=values.device).index_add(0, batch.member, values)


@torch.no_grad()
def prefix_sharing_matches(model, groups: Sequence[Group], *, pad_id: int, atol: float = 1e-4) -> bool:
    """Whether the shared layout gives the unshared log-probabilities on ``groups`` (False also
    when the model rejects the 4-D mask)."""
    device = next(model.parameters()).device
    scorer = Scorer(model)
    was_training = model.training
    model.eval()
    try:
        a_batch = pack_groups(groups, pad_id=pad_id, shared=True).to(device)
        a = member_sums(scorer(a_batch)[0], a_batch)
        b_batch = pack_groups(groups, pad_id=pad_id, shared=False).to(device)
        b = member_sums(scorer(b_batch)[0], b_batch)
        return bool(torch.allclose(a, b, atol=atol, rtol=0))
    except (RuntimeError, ValueError, TypeError):
        return False
    finally:
        model.train(was_training)
