"""The KV cache of :class:`engine.policy.TransformersPolicy`'s decoder: buffers sized for a whole
generation and reused from one call to the next, written in place, with finished rows leaving by
a copy proportional to the rows that left; and :class:`PrefixCache`, the keys and values of
contexts generated earlier, kept so that a later call continuing one of them skips its prompt
pass."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from engine.sampling import move_rows

__all__ = ["Arena", "BufferCache", "BufferLayer", "PrefixCache", "PrefixEntry"]


def _numba_copies(t: torch.Tensor) -> bool:
    """Whether copies between ``t`` and other CPU tensors run as numba kernels (CPU, single or
    double precision), rather than as torch indexing."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _fills_new_memory() -> bool:
    """Whether torch writes new tensors' memory (deterministic mode fills uninitialised memory)."""
    return torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory


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


@dataclass(frozen=True, eq=False)
class PrefixEntry:
    """A context's token ids, and where the keys and values of all of them but the last lie in its
    :class:`PrefixCache`'s token pools."""

    ids: tuple[int, ...]
    tokens: np.ndarray
    """Pool slots of the first ``len(ids) - 1`` tokens' keys and values, in order."""

    @property
    def length(self) -> int:
        return len(self.tokens)


class PrefixCache:
    """Keys and values of contexts generated earlier, by their text, up to ``max_bytes`` (the
    least recently used go first).

    :meth:`engine.policy.TransformersPolicy.generate` given one (``prefix_cache=``) stores each
    sample's context extended by its head (or by its text up to the stop), and a later call whose
    prompt is such a text runs only its last token through the model instead of the whole prompt.
    Search makes one per search: each round's nodes are the contexts of the next. A reused context
    is conditioned on the tokens that were sampled, which can differ from a fresh tokenisation of
    its text (never for character-level vocabularies). The entries hold for the weights they were
    computed with only: make a new cache after the weights change.

    Keys and values live in one pool of token slots per layer (``[slots, heads, head_dim]``, grown
    by doubling up to ``max_bytes``); an entry lists its tokens' slots, and a context stored from
    the continuation of another shares that one's slots (slots are reference-counted), so that
    storing a child copies only the tokens it adds."""

    def __init__(self, model, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.model = model
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self.pools: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._refs = np.zeros(0, np.int32)  # entries (and pending rows) holding each slot
        self._free = np.zeros(0, np.int64)  # a stack of the free slots, its top at _top
        self._top = 0
        self._reserved: list[torch.Tensor] | None = None  # on the CPU, the pools' memory (see _grown)
        self.token_bytes = 0
        self.hits = self.misses = self.stored = self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, text: str) -> bool:
        return text in self._entries

    @property
    def nbytes(self) -> int:
        """Memory of the slots in use."""
        return int((self._refs > 0).sum()) * self.token_bytes

    def get(self, text: str) -> PrefixEntry | None:
        """The entry for context ``text`` (counted as a hit or a miss), or None."""
        entry = self._entries.get(text)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(text)
        return entry

    def store_rows(self, cache: BufferCache, at: np.ndarray, tokens: np.ndarray, kept_end: np.ndarray,
                   ends: np.ndarray | None, first: np.ndarray, width: int, entries: list[PrefixEntry | None],
                   limits: np.ndarray | None = None) -> list[tuple[int, np.ndarray] | None]:
        """Store the contexts of the generating rows at batch positions ``at`` of ``cache``: each
        row's prompt (right-aligned at ``width``, its first position ``first``) and its tokens
        (``tokens``, a row each) up to and including the first in ``kept_end`` (a boolean table
        over the vocabulary), when that comes no later than the first in ``ends``. ``entries``:
        each row's prompt's entry, if it had one: its slots are shared, and only the rest is
        copied. ``limits``: per row, the tokens that count (the rest rode along after it stopped).
        Returns per row ``(tokens kept, slots)``, or None (no such token, or no room)."""
        hit = kept_end[tokens]
        if limits is not None:
            hit &= np.arange(tokens.shape[1]) < limits[:, None]
        kept = hit.argmax(1) + 1  # tokens up to and including the first kept_end token
        ok = hit.any(1)
        if ends is not None:
            end_hit = ends[tokens]
            ok &= ~end_hit.any(1) | (kept <= end_hit.argmax(1) + 1)
        out: list[tuple[int, np.ndarray] | None] = [None] * len(at)
        if not ok.any():
            return out
        which = np.flatnonzero(ok)
        # a prompt's entry holds all its tokens but the last: the copy starts at that one
        found = [entries[i] for i in which.tolist()]
        starts = np.where([e is not None for e in found], width - 1, first[which])
        shared = [e.tokens if e is not None else np.zeros(0, np.int64) for e in found]
        slots = self.store(cache, at[which], starts, width + kept[which] - 1 - starts, shared)
        for i, k, held in zip(which.tolist(), kept[which].tolist(), slots):
            if held is not None:
                out[i] = (k, held)
        return out

    def store(self, cache: BufferCache, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray,
              shared: list[np.ndarray]) -> list[np.ndarray | None]:
        """Copy positions ``starts[i] : starts[i] + counts[i]`` of rows ``rows[i]`` of ``cache``
        into the pools. Each context's slots are ``shared[i]`` (slots of a stored context it
        continues, or empty) followed by its own; None for a context that does not fit. The slots
        are held until :meth:`put` keeps them or :meth:`release` gives them back."""
        if not self.pools:
            self.pools = [(layer._k.new_empty((0, layer._k.shape[1], layer._k.shape[3])),
                           layer._v.new_empty((0, layer._v.shape[1], layer._v.shape[3]))) for layer in cache.layers]
            self.token_bytes = sum(t.shape[1] * t.shape[2] * t.element_size() for kv in self.pools for t in kv)
        for held in shared:
            self.hold(held)  # before any eviction below can free them
        n, ends = len(counts), np.cumsum(counts)
        if not self._make_room(int(ends[-1])):  # only the first contexts fit
            fit = int(np.searchsorted(ends, self._room(), side="right"))
            for held in shared[fit:]:
                self.release(held)
            rows, starts, counts, shared, ends = rows[:fit], starts[:fit], counts[:fit], shared[:fit], ends[:fit]
            if not fit:
                return [None] * n
            self._make_room(int(ends[-1]))
        total = int(ends[-1])
        slots = self._free[self._top - total : self._top][::-1].copy()
        self._top -= total
        self._refs[slots] = 1
        cache.copy_out(rows, starts, counts, self.pools, slots)
        kept = [np.concatenate([held, slots[end - n : end]]) for held, n, end in zip(shared, counts.tolist(), ends)]
        return kept + [None] * (n - len(kept))

    def _make_room(self, n: int) -> bool:
        """At least ``n`` free slots: grow the pools (doubling, up to ``max_bytes``; see
        :meth:`_grown`), else drop the fewest least recently used entries that free enough slots.
        False, dropping none, when even dropping every entry would not (slots held by a running
        call or by its pending contexts are not freed by dropping the entries that list them)."""
        capacity = len(self._refs)
        limit = self.max_bytes // max(self.token_bytes, 1)
        if self._top < n and capacity < limit:
            grown = min(limit, max(2 * capacity, capacity + n - self._top, 1024))
            self.pools = [(self._grown(k, limit, grown, 2 * i), self._grown(v, limit, grown, 2 * i + 1))
                          for i, (k, v) in enumerate(self.pools)]
            self._refs = np.concatenate([self._refs, np.zeros(grown - capacity, np.int32)])
            new = np.arange(grown - 1, capacity - 1, -1, dtype=np.int64)  # lowest slots on top of the stack
            self._free = np.concatenate([self._free[: self._top], new])
            self._top = len(self._free)
        if self._top >= n:
            return True
        if self._room() < n:
            return False
        refs, freed, victims = self._refs.copy(), self._top, 0
        for entry in self._entries.values():  # the least recently used first
            refs[entry.tokens] -= 1
            freed += int(np.count_nonzero(refs[entry.tokens] == 0))
            victims += 1
            if freed >= n:
                break
        for _ in range(victims):
            _, old = self._entries.popitem(last=False)
            self.release(old.tokens)
            self.evicted += 1
        return True

    def _grown(self, pool: torch.Tensor, limit: int, slots: int, index: int) -> torch.Tensor:
        """``pool`` with ``slots`` slots, its contents kept. On the CPU, the first growth reserves
        ``limit`` slots at once, untouched (the operating system maps memory as it is first
        written), and each later growth is a longer view of them: nothing is copied. Elsewhere
        (device memory is taken when reserved) the pool is copied into a larger one."""
        if pool.device.type == "cpu":
            if self._reserved is None and _fills_new_memory():  # it would write all of it
                self._reserved = []
            if self._reserved is None:
                try:
                    self._reserved = [t.new_empty((limit, *t.shape[1:])) for kv in self.pools for t in kv]
                except (RuntimeError, MemoryError):  # no address space for it: grow by copying
                    self._reserved = []
            if self._reserved:
                reserved = self._reserved[index]
                if pool.numel() and pool.data_ptr() != reserved.data_ptr():
                    reserved[: len(pool)] = pool
                return reserved[:slots]
        return torch.cat([pool, pool.new_empty((slots - len(pool), *pool.shape[1:]))])

    def _room(self) -> int:
        """Free slots there would be with every entry dropped: the free ones, and those that only
        entries hold."""
        listed = np.concatenate([e.tokens for e in self._entries.values()] + [np.zeros(0, np.int64)])
        only_entries = np.bincount(listed, minlength=len(self._refs)) == self._refs
        return self._top + int(np.count_nonzero(only_entries & (self._refs > 0)))

    def hold(self, tokens: np.ndarray) -> None:
        """Take one more hold on the slots ``tokens`` (an entry in use must keep its slots even if
        it is evicted meanwhile); :meth:`release` gives it back."""
        self._refs[tokens] += 1

    def release(self, tokens: np.ndarray) -> None:
        """Give back one hold on each of the slots ``tokens``."""
        self._refs[tokens] -= 1
        freed = tokens[self._refs[tokens] == 0]
        if len(freed):
            if self._top + len(freed) > len(self._free):
                self._free = np.concatenate([self._free, np.zeros(len(freed), np.int64)])
            self._free[self._top : self._top + len(freed)] = freed
            self._top += len(freed)

    def keep(self, contexts: list[tuple[str, list[int], str, np.ndarray]], stop: str, decode) -> None:
        """Keep stored contexts ``(prompt, token ids, sample text, slots)`` (see :meth:`store_rows`),
        each keyed by its text, the prompt and the sample's text up to and including the first
        ``stop``, when its ids decode (``decode``: lists of ids -> texts) to exactly that (a token
        that runs on past the stop does not); the others' slots are released."""
        for (prompt, ids, sample, slots), full in zip(contexts, decode([ids for _, ids, _, _ in contexts])):
            head = full[len(prompt):]
            spelled = full.startswith(prompt) and head.endswith(stop) and stop not in head[: -len(stop)]
            if spelled and sample.startswith(head):
                self.put(full, PrefixEntry(tuple(ids), slots))
            else:
                self.release(slots)

    def keep_spelled(self, contexts: list[tuple[str, list[int], np.ndarray]], decode) -> None:
        """Keep stored contexts ``(text, token ids, slots)`` whose ids decode (``decode``: lists of
        ids -> texts) to exactly their text; the others' slots are released."""
        for (text, ids, slots), full in zip(contexts, decode([ids for _, ids, _ in contexts])):
            if full == text:
                self.put(text, PrefixEntry(tuple(ids), slots))
            else:
                self.release(slots)

    def put(self, text: str, entry: PrefixEntry) -> None:
        """Keep ``entry`` for context ``text``, its slots held by it; a text already kept keeps its
        entry (the new one's slots are released)."""
        if text in self._entries:
            self.release(entry.tokens)
            return
        self._entries[text] = entry
        self.stored += 1

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.nbytes, "hits": self.hits, "misses": self.misses,
                "stored": self.stored, "evicted": self.evicted}
