"""Preference records to token ids with exact prompt/continuation boundaries.

``prompt + prefix`` and each continuation are tokenised separately and their ids concatenated, so
a continuation's first token can never merge with the end of the prefix. Sequences that are too
long lose tokens from the left of the prefix; a continuation is never cut, and a record whose
continuation alone does not fit is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["CollateStats", "TokenizedPair", "pad_sequences", "tokenize_pairs"]

Encode = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True)
class TokenizedPair:
    """One step-level pair as token ids."""

    context: list[int]
    """Ids of ``prompt + prefix``."""
    chosen: list[int]
    rejected: list[int]


@dataclass(frozen=True)
class CollateStats:
    """What tokenisation had to do to fit ``max_length``."""

    kept: int
    truncated: int
    """Records whose prefix lost tokens on the left."""
    skipped: int
    """Records dropped because a continuation alone exceeded ``max_length``."""
    context_tokens: int
    continuation_tokens: int


def tokenize_pairs(
    records: Sequence[dict], encode: Encode, max_length: int
) -> tuple[list[TokenizedPair], CollateStats]:
    """Tokenise pair records (``prompt``, ``prefix``, ``chosen``, ``rejected``)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    contexts = encode([r["prompt"] + r.get("prefix", "") for r in records])
    chosen = encode([r["chosen"] for r in records])
    rejected = encode([r["rejected"] for r in records])
    out, truncated, skipped, ctx_tok, cont_tok = [], 0, 0, 0, 0
    for ctx, cw, cl in zip(contexts, chosen, rejected):
        longest = max(len(cw), len(cl))
        if longest == 0 or longest >= max_length:
            skipped += 1
            continue
        room = max_length - longest
        if len(ctx) > room:
            ctx = ctx[len(ctx) - room :]
            truncated += 1
        if not ctx:
            skipped += 1
            continue
        out.append(TokenizedPair(list(ctx), list(cw), list(cl)))
        ctx_tok += len(ctx)
        cont_tok += len(cw) + len(cl)
    return out, CollateStats(len(out), truncated, skipped, ctx_tok, cont_tok)


def pad_sequences(
    contexts: Sequence[list[int]], continuations: Sequence[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` (1 on continuation tokens)
    for rows ``context + continuation``; all ``[N, L]``."""
    seqs = [c + k for c, k in zip(contexts, continuations)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (c, s) in enumerate(zip(contexts, seqs)):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[r, : len(s)] = 1
        loss[r, len(c) : len(s)] = True
    return ids, attn, loss
