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

__all__ = ["CollateStats", "TokenizedPair", "pad_sequences", "split_steps", "tokenize_groups", "tokenize_pairs"]

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


def split_steps(text: str) -> list[str]:
    """A continuation's steps: its lines, each keeping its newline."""
    return text.splitlines(keepends=True) or [text]


def tokenize_groups(
    contexts: Sequence[str], continuations: Sequence[Sequence[str]], encode: Encode, max_length: int, *,
    steps: bool = False,
) -> tuple[list, list[int], CollateStats]:
    """Tokenise ``contexts[i]`` and each of ``continuations[i]`` separately (each step separately
    when ``steps``) into :class:`trainers.packing.Group` objects; also the indices of the records
    kept. A continuation is never cut: the context loses tokens on the left so that context plus
    the longest continuation fit ``max_length``, and a record whose longest continuation alone
    does not fit is skipped."""
    from trainers.packing import Group

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ctx_ids = encode(list(contexts))
    flat = [piece for conts in continuations for c in conts for piece in (split_steps(c) if steps else [c])]
    pieces = iter(encode(flat))
    out, kept, truncated, skipped, ctx_tok, cont_tok = [], [], 0, 0, 0, 0
    for i, (ctx, conts) in enumerate(zip(ctx_ids, continuations)):
        ids, lengths = [], []
        for c in conts:
            parts = [next(pieces) for _ in (split_steps(c) if steps else [c])]
            ids.append([t for p in parts for t in p])
            lengths.append([len(p) for p in parts])
        longest = max((len(x) for x in ids), default=0)
        if longest == 0 or longest >= max_length or min(len(x) for x in ids) == 0:
            skipped += 1
            continue
        room = max_length - longest
        if len(ctx) > room:
            ctx = ctx[len(ctx) - room :]
            truncated += 1
        if not ctx:
            skipped += 1
            continue
        out.append(Group(list(ctx), ids, lengths if steps else None))
        kept.append(i)
        ctx_tok += len(ctx)
        cont_tok += sum(map(len, ids))
    return out, kept, CollateStats(len(out), truncated, skipped, ctx_tok, cont_tok)


def tokenize_pairs(
    records: Sequence[dict], encode: Encode, max_length: int
) -> tuple[list[TokenizedPair], CollateStats]:
    """Tokenise pair records (``prompt``, ``prefix``, ``chosen``, ``rejected``) with the rules of
    :func:`tokenize_groups` (exact boundaries, the context cut from the left, never a continuation)."""
    groups, _, stats = tokenize_groups([r["prompt"] + r.get("prefix", "") for r in records],
                                       [(r["chosen"], r["rejected"]) for r in records], encode, max_length)
    return [TokenizedPair(g.context, g.continuations[0], g.continuations[1]) for g in groups], stats


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
