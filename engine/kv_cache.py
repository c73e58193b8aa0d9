"""The KV cache of :class:`engine.policy.TransformersPolicy`'s decoder: buffers sized for a whole
generation and reused from one call to the next, written in place, with finished rows leaving by
a copy proportional to the rows that left, and the copies between it and the token pools of an
:class:`engine.prefix_cache.PrefixCache`."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from engine.sampling import move_rows

if TYPE_CHECKING:
    from engine.prefix_cache import PrefixCache, PrefixEntry

__all__ = ["Arena", "BufferCache", "BufferLayer"]


def _numba_copies(t: torch.Tensor) -> bool:
    """Whether copies between ``t`` and other CPU tensors run as numba kernels (CPU, single or
    double precision), rather than as torch indexing."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _spans(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``starts[i] : starts[i] + counts[i]`` for each ``i``, one span after another, and
    the ``i`` of each."""
    which = np.repeat(np.arange(len(counts)), counts)
    return which, starts[which] + np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)


@njit(cache=True, nogil=True)
def _copy_out(keys, values, rows, starts, counts, pool_k, pool_v, dst):
    """``pool[dst[t]] = buffer[rows[i], :, starts[i] + j]`` for the ``j``-th of the ``counts[i]``
    positions of row ``i``, ``t`` running over all of them in order (keys and values)."""
    t = 0
    for i in range(rows.shape[0]):
        r, s = rows[i], starts[i]
        for j in range(counts[i]):
            d = dst[t]
            t += 1
            for h in range(keys.shape[1]):
                for e in range(keys.shape[3]):  # element loops: 2x faster than slice copies this short
                    pool_k[d, h, e] = keys[r, h, s + j, e]
            for h in range(values.shape[1]):  # value heads may differ from key heads in size
                for e in range(values.shape[3]):
                    pool_v[d, h, e] = values[r, h, s + j, e]


@njit(cache=True, nogil=True)
def _copy_in(keys, values, pool_k, pool_v, src, first_rows, slots, repeats):
    """``buffer[first_rows[t] + r, :, slots[t]] = pool[src[t]]`` for ``r < repeats[t]`` (keys and
    values)."""
    for t in range(src.shape[0]):
        p, row, slot = src[t], first_rows[t], slots[t]
        for r in range(repeats[t]):
            for h in range(keys.shape[1]):
                for e in range(keys.shape[3]):
                    keys[row + r, h, slot, e] = pool_k[p, h, e]
            for h in range(values.shape[1]):
                for e in range(values.shape[3]):
                    values[row + r, h, slot, e] = pool_v[p, h, e]


class Arena:
    """Flat tensors kept from one generation to the next, so that the KV cache is written into
    memory that is already mapped: a fresh buffer of this size costs as much in page faults as
    the copy into it."""

    def __init__(self):
        self._store: dict[tuple, torch.Tensor] = {}

    def tensor(self, key: tuple, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of ``shape`` on the storage named ``key`` (grown when too small)."""
        numel = math.prod(shape)
        flat = self._store.get(key)
        if flat is None or flat.numel() < numel or flat.dtype != like.dtype or flat.device != like.device:
            # zeroed once: a prefilled cache (BufferCache.prefill) leaves masked slots unwritten, and
            # masked slots must hold finite numbers (a NaN times a zero attention weight is NaN)
            flat = self._store[key] = like.new_zeros(numel)
        return flat[:numel].view(shape)


class BufferLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values in place into a buffer sized for the whole
    generation, instead of concatenating (which copies the whole cache at every token). Prompt rows
    are repeated in the first update (``counts``: rows per prompt) and finished rows leave in place
    (:meth:`fill_holes`); the cache's own row reordering is not supported. Growing past the planned
    length copies into the other of two buffers that take turns. ``keys``/``values`` are views of
    the filled part."""

    def __init__(self, capacity: int, arena: Arena, index: int, counts: int | np.ndarray = 1):
        super().__init__()
        self.capacity, self.arena, self.index = int(capacity), arena, index
        self.counts = counts if isinstance(counts, np.ndarray) else None  # rows per prompt, when they differ
        self.repeats = 0 if self.counts is not None else int(counts)  # rows per prompt, when all have as many
        self.length = 0
        self.side = 0
        self.prompt_pass = True
        self._load = None

    def _buffers(self, side: int, rows: int, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int):
        k = self.arena.tensor((self.index, "k", side), (rows, like_k.shape[1], capacity, like_k.shape[-1]), like_k)
        v = self.arena.tensor((self.index, "v", side), (rows, like_v.shape[1], capacity, like_v.shape[-1]), like_v)
        return k, v

    def allocate(self, rows: int, like_k: torch.Tensor, like_v: torch.Tensor, length: int = 0,
                 load: tuple | None = None) -> None:
        """Take buffers for ``rows`` rows (heads, head size, dtype and device as ``like_k`` /
        ``like_v``); the first ``length`` positions count as filled, by ``load`` (see
        :meth:`BufferCache.prefill`) at the first update."""
        self.device = like_k.device
        self._k, self._v = self._buffers(0, rows, like_k, like_v, max(self.capacity, length))
        self.length = int(length)
        self.is_initialized = True
        self._load = load
        self._views()

    def _load_prefix(self, pool_k, pool_v, src, first_rows, slots, reps) -> None:
        """Write pool tokens ``src`` at positions ``slots`` of rows ``first_rows`` and the
        ``reps - 1`` rows after each."""
        if _numba_copies(self._k):
            _copy_in(self._k.numpy(), self._v.numpy(), pool_k.numpy(), pool_v.numpy(), src, first_rows, slots, reps)
            return
        which, rows = _spans(first_rows, reps)  # each token's rows, one after another
        rows, at, src = (torch.from_numpy(x).to(self._k.device) for x in (rows, slots[which], src[which]))
        self._k.transpose(1, 2)[rows, at] = pool_k[src]
        self._v.transpose(1, 2)[rows, at] = pool_v[src]

    def _rows(self, prompts: int) -> int:
        """Rows for ``prompts`` prompts."""
        return prompts * self.repeats if self.counts is None else int(self.counts.sum())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.allocate(self._rows(key_states.shape[0]), key_states, value_states)
        if self._load is not None:
            # the stored prefix's keys and values go in at this layer's first update, inside the
            # forward pass that reads them (as a paged-attention kernel reads them from its pool)
            self._load_prefix(*self._load)
            self._load = None
        if self.prompt_pass and self._k.shape[0] != key_states.shape[0]:
            # the prompt pass: its keys and values written straight into each sample's row; it
            # attends within its own rows, to what was prefilled before it as well
            self.prompt_pass = False
            rows, start = key_states.shape[0], self.length
            end = start + key_states.shape[-2]
            if self.counts is None:
                self._k[:, :, start:end].unflatten(0, (rows, self.repeats))[:] = key_states[:, None]
                self._v[:, :, start:end].unflatten(0, (rows, self.repeats))[:] = value_states[:, None]
            else:
                owner = torch.from_numpy(np.repeat(np.arange(rows), self.counts)).to(key_states.device)
                self._k[:, :, start:end] = key_states[owner]
                self._v[:, :, start:end] = value_states[owner]
            self.length = end
            self._views()
            if start == 0:
                return key_states, value_states
            if self.counts is None:
                return self.keys[:: self.repeats], self.values[:: self.repeats]  # each prompt's first row
            first = torch.from_numpy(np.cumsum(self.counts) - self.counts).to(key_states.device)
            return self.keys[first], self.values[first]
        self.prompt_pass = False
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[2]:  # more tokens than planned for: move to a larger buffer
            side = 1 - self.side
            k, v = self._buffers(side, self._k.shape[0], self._k, self._v, max(end, 2 * self._k.shape[2]))
            k[:, :, : self.length] = self.keys
            v[:, :, : self.length] = self.values
            self._k, self._v, self.side = k, v, side
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("rows leave a BufferCache through drop_rows")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a BufferCache repeats its prompt rows in its first update (counts=)")

    def fill_holes(self, holes: np.ndarray, movers: np.ndarray, rows: int, starts: np.ndarray,
                   on_device: dict | None = None) -> None:
        """Copy rows ``movers`` into rows ``holes`` (in place, filled positions only; on the CPU,
        in single or double precision, by one numba copy from each mover's first attended position
        ``starts``), then keep the first ``rows`` rows. ``on_device``: ``movers`` and ``holes`` as
        tensors by device, filled as needed (the layers of a cache share them)."""
        if self.is_initialized:
            if len(holes) and _numba_copies(self._k):
                move_rows(self._k.numpy(), self._v.numpy(), holes, movers, starts, self.length)
            elif len(holes):
                on_device = {} if on_device is None else on_device
                if self._k.device not in on_device:
                    on_device[self._k.device] = tuple(torch.from_numpy(x).to(self._k.device) for x in (movers, holes))
                at, to = on_device[self._k.device]
                for buf, filled in ((self._k, self.keys), (self._v, self.values)):
                    buf[:, :, : self.length].index_copy_(0, to, filled.index_select(0, at))
            self._k, self._v = self._k[:rows], self._v[:rows]
            self._views()


class BufferCache(DynamicCache):
    """A ``DynamicCache`` made of :class:`BufferLayer` s of ``capacity`` positions in ``arena``."""

    def __init__(self, capacity: int, arena: Arena, counts: int | np.ndarray = 1):
        """``counts``: the rows the first forward pass (the prompts) fills per prompt, as many for
        each (an int) or one number per prompt (an array)."""
        Cache.__init__(self, layer_class_to_replicate=lambda: BufferLayer(capacity, arena, len(self.layers), counts))
        self.counts = counts

    def prefill(self, rows: int, length: int, prefixes: PrefixCache,
                parts: list[tuple[int, int, PrefixEntry, int]]) -> None:
        """Before the first forward pass: every layer's buffers for ``rows`` rows (``counts`` per
        prompt), their first ``length`` positions counted as filled. ``parts``: ``(prompt, slot,
        entry, count)``, the first ``count`` positions of ``entry`` (in ``prefixes``) go from
        position ``slot`` into each of the prompt's rows; each layer copies them in at its first
        update, all in one copy. Positions not written are masked (padding)."""
        rep = self.layer_class_to_replicate
        part, slots = _spans(np.array([s for _, s, _, _ in parts]), np.array([count for *_, count in parts]))
        src = np.concatenate([entry.tokens[:count] for _, _, entry, count in parts])
        prompt = np.array([i for i, *_ in parts])[part]
        if isinstance(self.counts, np.ndarray):
            first_rows, reps = (np.cumsum(self.counts) - self.counts)[prompt], self.counts[prompt]
        else:
            first_rows, reps = prompt * self.counts, np.full(len(prompt), self.counts)
        for pool_k, pool_v in prefixes.pools:
            layer = rep()
            self.layers.append(layer)
            layer.allocate(rows, pool_k[None].transpose(1, 2), pool_v[None].transpose(1, 2), length,
                           load=(pool_k, pool_v, src, first_rows, slots, reps))

    def copy_out(self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                 pools: list[tuple[torch.Tensor, torch.Tensor]], dst: np.ndarray) -> None:
        """Copy positions ``starts[i] : starts[i] + counts[i]`` of each row ``rows[i]``, row after
        row, into the pool slots ``dst`` of each layer's ``(keys, values)`` pools."""
        for layer, (pool_k, pool_v) in zip(self.layers, pools):
            if _numba_copies(layer._k):
                _copy_out(layer._k.numpy(), layer._v.numpy(), rows, starts, counts, pool_k.numpy(), pool_v.numpy(),
                          dst)
                continue
            which, at = _spans(starts, counts)
            device = layer._k.device
            r, a, d = (torch.from_numpy(x).to(device) for x in (rows[which], at, dst))
            pool_k[d] = layer._k.transpose(1, 2)[r, a]
            pool_v[d] = layer._v.transpose(1, 2)[r, a]

    def drop_rows(self, alive: np.ndarray, first: np.ndarray) -> np.ndarray:
        """Keep the rows where ``alive`` (``[rows]`` bool) is True, moving as few as possible: each
        live row past the first ``n`` (``n`` = number alive) fills the place of a finished row among
        them, so the copy is proportional to the rows that finished, not to the rows that remain.
        ``first`` (``[rows]``): each row's first attended position (the attention mask, which
        moves with the rows, hides what lies before it). Returns the old row index of each
        remaining row. (NumPy arrays: the row bookkeeping is a few small operations, cheaper on
        the host than as tensors on any device.)"""
        n = int(np.count_nonzero(alive))
        holes = np.flatnonzero(~alive[:n])
        movers = np.flatnonzero(alive[n:]) + n
        starts = first[movers]
        on_device: dict = {}
        for layer in self.layers:
            layer.fill_holes(holes, movers, n, starts, on_device)
        order = np.arange(n)
        order[holes] = movers
        return order
