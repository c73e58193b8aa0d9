"""Per-step sampling for :class:`engine.policy.TransformersPolicy`'s decoder.

Two forms of the same step: tensor operations (any device), and one numba kernel for the CPU.
On the CPU each tensor operation costs several microseconds whatever its size, and a decoding
step's bookkeeping (softmax, draw, log-probability, end and head checks, row counts) takes about
fifteen of them; with a small model that is a large share of the step. The kernel does all of it
in one call per step, in place on NumPy views of the decoder's tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

__all__ = ["HASH_BASE", "decode_step", "move_rows", "sample_inverse_cdf"]

HASH_BASE = 1_000_003
"""Multiplier of the rolling hash of each row's head (see ``unique_heads``)."""


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``probs`` (``[rows, vocab]``, rows need not sum to 1), as ``[rows, 1]``,
    by inverse-CDF sampling: exact, and on CPU several times faster than ``torch.multinomial`` for
    one draw per row. A token of probability 0 is never drawn (its CDF interval is empty). ``u``:
    the uniform draws in [0, 1) (``[rows]``), drawn here when not given."""
    cdf = probs.cumsum(-1)
    if u is None:
        u = torch.rand(probs.shape[0], device=probs.device)
    u = u.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)


@njit(cache=True, nogil=True)
def decode_step(logits, u, inv_temperature, rows, t, out_tok, out_lp, alive, ends, heads, head_open, head_hash,
                track_heads, tok, closing):
    """One decoding step for every row of the batch, in place.

    ``logits`` ``[n, V]``: the next-token logits. Row ``i`` draws its token by inverse CDF with the
    uniform ``u[rows[i]]`` from ``softmax(logits * inv_temperature)`` (greedy argmax when
    ``inv_temperature <= 0``), writes it to ``tok[i, 0]`` and, with its log-probability at
    temperature 1, to ``out_tok[rows[i], t]`` / ``out_lp[rows[i], t]``. A live row whose token is in
    ``ends`` (a boolean table over the vocabulary; empty for none) stops (``alive[i, 0] = False``).
    With ``track_heads``, a row whose head is open adds the token to its rolling ``head_hash``; a
    live one whose token is in ``heads`` closes its head and is flagged in ``closing[i]``.
    Returns the number of rows still alive and the number flagged."""
    n, vocab = logits.shape
    live = 0
    closed = 0
    cdf = np.empty(vocab)
    for i in range(n):
        x = logits[i]
        top = x[0]
        best = 0
        for j in range(1, vocab):
            if x[j] > top:
                top = x[j]
                best = j
        total = 0.0
        for j in range(vocab):
            total += np.exp(np.float64(x[j]) - top)
            cdf[j] = total  # the CDF at temperature 1
        lse = top + np.log(total)
        if inv_temperature <= 0.0:
            k = best
        else:
            acc = total
            if inv_temperature != 1.0:
                acc = 0.0
                for j in range(vocab):
                    acc += np.exp((np.float64(x[j]) - top) * inv_temperature)
                    cdf[j] = acc
            target = u[rows[i]] * acc
            k = vocab - 1
            for j in range(vocab):  # the first token whose CDF exceeds the draw
                if cdf[j] > target:
                    k = j
                    break
        tok[i, 0] = k
        out_tok[rows[i], t] = k
        out_lp[rows[i], t] = np.float64(x[k]) - lse
        was_alive = alive[i, 0]
        if track_heads and head_open[i, 0]:
            head_hash[i, 0] = head_hash[i, 0] * HASH_BASE + k
            if was_alive and heads[k]:
                head_open[i, 0] = False
                closing[i] = True
                closed += 1
        if was_alive and ends.shape[0] > 0 and ends[k]:
            alive[i, 0] = False
        if alive[i, 0]:
            live += 1
    return live, closed


@njit(cache=True, nogil=True)
def move_rows(keys, values, holes, movers, starts, length):
    """``keys[holes[i], :, s:length] = keys[movers[i], :, s:length]`` with ``s = starts[i]``, for
    each ``i``, and the same for ``values`` (``[rows, heads, positions, head_dim]`` arrays): the
    cache's finished rows refilled by live ones in one pass over the memory moved (the tensor form
    reads the movers into a new tensor first). ``starts[i]``: the mover's first position that is
    attended to (its left padding is masked, so it need not move)."""
    for i in range(holes.shape[0]):
        h, m, s = holes[i], movers[i], starts[i]
        for j in range(keys.shape[1]):
            keys[h, j, s:length] = keys[m, j, s:length]
            values[h, j, s:length] = values[m, j, s:length]
