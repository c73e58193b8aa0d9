"""The KV cache of :class:`engine.policy.TransformersPolicy`'s decoder: buffers sized for a whole
generation and reused from one call to the next, written in place, with finished rows leaving by
a copy proportional to the rows that left."""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from engine.sampling import move_rows

__all__ = ["Arena", "BufferCache", "BufferLayer"]


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
            flat = self._store[key] = like.new_empty(numel)
        return flat[:numel].view(shape)


class BufferLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values in place into a buffer sized for the whole
    generation, instead of concatenating (which copies the whole cache at every token). Prompt rows
    are repeated in the first update (``repeats``) and finished rows leave in place
    (:meth:`fill_holes`); the cache's own row reordering is not supported. Growing past the planned
    length copies into the other of two buffers that take turns. ``keys``/``values`` are views of
    the filled part."""

    def __init__(self, capacity: int, arena: Arena, index: int, repeats: int = 1):
        super().__init__()
        self.capacity, self.arena, self.index, self.repeats = int(capacity), arena, index, int(repeats)
        self.length = 0
        self.side = 0

    def _buffers(self, side: int, rows: int, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int):
        k = self.arena.tensor((self.index, "k", side), (rows, like_k.shape[1], capacity, like_k.shape[-1]), like_k)
        v = self.arena.tensor((self.index, "v", side), (rows, like_v.shape[1], capacity, like_v.shape[-1]), like_v)
        return k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.device = key_states.device
            rows, length = key_states.shape[0], key_states.shape[-2]
            self._k, self._v = self._buffers(0, rows * self.repeats, key_states, value_states,
                                             max(self.capacity, length))
            self.is_initialized = True
            if self.repeats > 1:  # the prompt pass: its keys and values written straight into each sample's row
                self._k[:, :, :length].unflatten(0, (rows, self.repeats))[:] = key_states[:, None]
                self._v[:, :, :length].unflatten(0, (rows, self.repeats))[:] = value_states[:, None]
                self.length = length
                self._views()
                return key_states, value_states  # the prompt pass attends within its own rows
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
        raise NotImplementedError("a BufferCache repeats its prompt rows in its first update (repeats=)")

    def fill_holes(self, holes: torch.Tensor, movers: torch.Tensor, rows: int, starts: torch.Tensor) -> None:
        """Copy rows ``movers`` into rows ``holes`` (in place, filled positions only; on the CPU,
        in single or double precision, by one numba copy from each mover's first attended position
        ``starts``), then keep the first ``rows`` rows."""
        if self.is_initialized:
            if len(holes) and self._k.device.type == "cpu" and self._k.dtype in (torch.float32, torch.float64):
                move_rows(self._k.numpy(), self._v.numpy(), holes.numpy(), movers.numpy(), starts.numpy(),
                          self.length)
            elif len(holes):
                for buf, filled in ((self._k, self.keys), (self._v, self.values)):
                    buf[:, :, : self.length].index_copy_(0, holes, filled.index_select(0, movers))
            self._k, self._v = self._k[:rows], self._v[:rows]
            self._views()


class BufferCache(DynamicCache):
    """A ``DynamicCache`` made of :class:`BufferLayer` s of ``capacity`` positions in ``arena``."""

    def __init__(self, capacity: int, arena: Arena, repeats: int = 1):
        """``repeats > 1``: the first forward pass (the prompts) fills ``repeats`` rows per prompt."""
        Cache.__init__(self, layer_class_to_replicate=lambda: BufferLayer(capacity, arena, len(self.layers), repeats))

    def drop_rows(self, alive: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Keep the rows where ``alive`` (``[rows]`` bool) is True, moving as few as possible: each
        live row past the first ``n`` (``n`` = number alive) fills the place of a finished row among
        them, so the copy is proportional to the rows that finished, not to the rows that remain.
        ``first`` (``[rows]``): each row's first attended position (the attention mask, which
        moves with the rows, hides what lies before it). Returns the old row index of each
        remaining row."""
        n = int(alive.sum())
        holes = torch.nonzero(~alive[:n])[:, 0]
        movers = torch.nonzero(alive[n:])[:, 0] + n
        starts = first[movers]
        for layer in self.layers:
            layer.fill_holes(holes, movers, n, starts)
        order = torch.arange(n, device=alive.device)
        order[holes] = movers
        return order
