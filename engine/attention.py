"""Attention for decoding steps on the CPU: one query per row, as four tensor operations.

With one query per row, ``torch.nn.functional.scaled_dot_product_attention`` on the CPU runs a
blocked kernel meant for many queries; the plain form (scores by batched matrix-vector products,
mask added, softmax, weighted sum of values) computes the same values in less time for large
batches: 419 against 582 us for 174 rows over 60 positions, 1 156 against 1 501 us for 256 rows
over 120, about equal at 16-67 rows (the tiny default model's heads, two threads, best of five).
Inside the engine's MCTS search, attention took 12% less time (64 tasks: 0.52 -> 0.46 s a search;
1 024 tasks: 5.5 -> 4.8 s, a quarter of that search's wall time; medians of runs alternating in
one process, same trees).

:func:`decoding_attention` is registered with ``transformers`` as :data:`ATTENTION` (an attention
function and, for the prompt pass, ``sdpa``'s mask builder); :func:`decoding_attention_for` makes a
CPU model that uses ``sdpa`` use it while a block runs (its configuration is put back after, and is
never saved with it). Anything but a step of one query per row in single or double precision without
dropout, biases, soft-capping or attention sinks (prompt passes, training, other devices) goes to
``sdpa`` itself.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

__all__ = ["ATTENTION", "decoding_attention", "decoding_attention_for"]

ATTENTION = "engine_decoding"
"""The name the attention function is registered under (``config._attn_implementation``)."""

_FULL_PRECISION = (torch.float32, torch.float64)
"""Dtypes the plain form runs in (in half precision ``sdpa`` accumulates the softmax in float32)."""

_SDPA_ONLY = ("position_bias", "softcap", "s_aux", "sinks")
"""Arguments the plain form does not apply: a step given any of them goes to ``sdpa``."""


def decoding_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """``transformers`` attention function: ``query`` ``[rows, heads, 1, head_dim]`` against ``key``
    and ``value`` ``[rows, kv_heads, positions, head_dim]`` (grouped query heads attend to their
    key/value head without copies), ``attention_mask`` ``[rows, 1, 1, positions]`` boolean (True:
    attend) or additive, or None. Returns ``[rows, 1, heads, head_dim]`` as ``sdpa`` does; other
    cases are ``sdpa``'s own."""
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    if (queries != 1 or dropout or query.device.type != "cpu" or query.dtype not in _FULL_PRECISION or heads % kv_heads
            or (attention_mask is not None and attention_mask.shape[1:3] != (1, 1))
            or any(kwargs.get(name) is not None for name in _SDPA_ONLY)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # query heads grouped by their key/value head
    scores = torch.matmul(q, key.transpose(-1, -2))
    scores.mul_(dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores.add_(attention_mask)
    out = torch.matmul(torch.softmax(scores, dim=-1), value)
    return out.reshape(rows, 1, heads, value.shape[-1]), None


AttentionInterface.register(ATTENTION, decoding_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


@contextlib.contextmanager
def decoding_attention_for(model: torch.nn.Module):
    """While the block runs, ``model`` attends with :func:`decoding_attention` if it is on the CPU
    and uses ``sdpa``; otherwise it is left as it is."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or next(model.parameters()).device.type != "cpu":
        yield
        return
    config._attn_implementation = ATTENTION  # sets its sub-configurations too
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
