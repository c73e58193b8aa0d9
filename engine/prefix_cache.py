"""The prefix cache of :class:`engine.policy.TransformersPolicy`: the keys and values of contexts
generated earlier, kept in token pools so that a later call continuing one of them skips its
prompt pass. The copies between its pools and a call's :class:`engine.kv_cache.BufferCache` are
that class's."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from engine.kv_cache import BufferCache

__all__ = ["PoolMemory", "PrefixCache", "PrefixEntry"]


def _fills_new_memory() -> bool:
    """Whether torch writes new tensors' memory (deterministic mode fills uninitialised memory)."""
    return torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory


class PoolMemory:
    """The CPU memory reserved for the token pools of one :class:`PrefixCache` at a time, handed on
    to the next cache once that one is gone (a policy keeps one, as it keeps its KV-cache arena).
    The operating system maps reserved memory as it is first written, a page fault per 4 KiB:
    on a fresh reservation that costs more than the copies into it (about 12 ms of a 64-task
    search on 2 cores, against 5 ms for the copies), while a search writing into the memory of
    the previous one finds its pages mapped."""

    def __init__(self):
        self._spare: list[torch.Tensor] | None = None

    def take(self, wanted: list[tuple[int, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The spare reservation, if there is one holding ``(slots, like)`` for each pool (at least
        ``slots`` slots shaped, typed and placed as ``like``'s), as views of those sizes and the
        whole tensors (to :meth:`give` back); else None. A taken reservation is no longer spare."""
        spare, self._spare = self._spare, None
        if spare is None or len(spare) != len(wanted):
            return None
        for t, (slots, like) in zip(spare, wanted):
            if (len(t) < slots or t.shape[1:] != like.shape[1:] or t.dtype != like.dtype
                    or t.device != like.device):
                return None
        return [t[:slots] for t, (slots, _) in zip(spare, wanted)], spare

    def give(self, tensors: list[torch.Tensor]) -> None:
        """Make ``tensors`` (a reservation no cache uses any more) the spare one."""
        self._spare = tensors


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

    def __init__(self, model, max_bytes: int, memory: PoolMemory | None = None):
        """``memory``: where the pools' CPU memory is reserved from, and goes back to when this cache
        is gone (see :class:`PoolMemory`); None: reserved afresh."""
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
        self._memory = memory
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
                self._reserve(limit)
            if self._reserved:
                reserved = self._reserved[index]
                if pool.numel() and pool.data_ptr() != reserved.data_ptr():
                    reserved[: len(pool)] = pool
                return reserved[:slots]
        return torch.cat([pool, pool.new_empty((slots - len(pool), *pool.shape[1:]))])

    def _reserve(self, limit: int) -> None:
        """Reserve ``limit`` slots for every pool: the spare memory of ``memory`` when it holds
        them, else new memory (given to ``memory`` when this cache is gone)."""
        pools = [t for kv in self.pools for t in kv]
        taken = self._memory.take([(limit, t) for t in pools]) if self._memory is not None else None
        if taken is not None:
            self._reserved, whole = taken
        else:
            try:
                self._reserved = whole = [t.new_empty((limit, *t.shape[1:])) for t in pools]
            except (RuntimeError, MemoryError):  # no address space for it: grow by copying
                self._reserved = []
                return
        if self._memory is not None:
            weakref.finalize(self, self._memory.give, whole)

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
