"""Policies: sample continuations with their log-probabilities, and score given continuations.

:class:`TransformersPolicy` wraps any local causal LM that ``transformers`` can load (CPU or GPU).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.kv_cache import Arena, BufferCache, PrefixCache, PrefixEntry
from engine.sampling import HASH_BASE, decode_step, sample_inverse_cdf

__all__ = ["Sample", "TransformersPolicy"]

_MASK_AS_GIVEN = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "olmo",
                            "olmo2", "granite", "phi3", "starcoder2"})
"""Model types whose forward pass hands its attention mask only to transformers' mask builders,
which return a 4-D mask as it is (see ``TransformersPolicy._step_mask``)."""


@dataclass(frozen=True)
class Sample:
    """One sampled continuation."""

    text: str
    """The continuation, cut just after the first stop string (which it keeps)."""
    logprob: float
    """Sum of the log-probabilities of its tokens under the policy (temperature 1)."""
    num_tokens: int
    """Number of tokens generated up to and including the stop."""
    finished: bool
    """True when generation ended on the stop string or end-of-sequence, not on the length cap."""
    head_tokens: int = 0
    """With ``generate(..., head_stop=S)``: the number of tokens up to and including the first one
    that contains ``S`` (all of them when none does); otherwise ``num_tokens``."""
    head_logprob: float = 0.0
    """The summed log-probability of those ``head_tokens`` tokens."""
    duplicate: bool = False
    """With ``generate(..., unique_heads=True)``: its head repeated the head of an earlier sample
    of the same prompt, so it was stopped right after it (its text is the head)."""
    parked: bool = False
    """With ``generate(..., park=N)``: the call returned while this sample was still running (its
    text is what it had so far, ``finished`` is False); ``generate([prompt + text])`` continues
    it (from one position, with the prefix cache it was stored in)."""


def _per_prompt(name: str, value, prompts: int, *, least: int) -> np.ndarray:
    """``value`` (one number for all prompts, or one per prompt) as one integer per prompt, each at
    least ``least``."""
    out = np.full(prompts, value, np.int64) if np.ndim(value) == 0 else np.array(value, np.int64).reshape(-1)
    if len(out) != prompts:
        raise ValueError(f"{name} has {len(out)} numbers for {prompts} prompts; give one per prompt, or a single "
                         "number for all")
    if len(out) and out.min() < least:
        raise ValueError(f"{name} must be >= {least}, got {int(out.min())}")
    return out


class TransformersPolicy:
    """A ``transformers`` causal LM behind the policy interface used by search and evaluation.

    Prompts and continuations are tokenised separately and their ids concatenated, so a
    continuation's tokens never merge with the prompt's.
    """

    def __init__(self, model, tokenizer, *, device: str | torch.device = "cpu", batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_id = tokenizer.eos_token_id
        self._stop_ids: dict[str, list[int]] = {}
        self._arena = Arena()  # KV-cache memory reused across generate calls
        self.fused_cpu_step = True
        """On the CPU, each decoding step's bookkeeping runs as one numba kernel
        (:func:`engine.sampling.decode_step`); False uses the tensor form there too. (Finished rows'
        cache entries are moved by :func:`engine.sampling.move_rows` either way, on the CPU in
        single or double precision.)"""

    # -- helpers -------------------------------------------------------------------------------
    def _backend(self):
        """The fast tokenizer's Rust backend when it can be called directly, else None.

        Through the backend, texts are encoded without character offsets (``encode_batch_fast``)
        and token ids decoded one row at a time, without the type checks that ``batch_decode``
        runs in Python on every id and without the thread pool of the backend's batch decoding:
        on the CPU, its threads contend with torch's for the cores between two forward passes
        (decoding does not need it; encoding still uses it). The backend is used only where it
        gives what the tokenizer's own call does: no truncation or padding configured in it, no
        clean-up of tokenisation spaces."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if (backend is None or backend.truncation is not None or backend.padding is not None
                or getattr(self.tokenizer, "clean_up_tokenization_spaces", False)):
            return None
        return backend

    def _encode(self, texts: list[str]) -> list[list[int]]:
        backend = self._backend()
        if backend is not None:
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # tokenizers >= 0.21
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _texts(self, seqs: list[list[int]]) -> list[str]:
        """``tokenizer.batch_decode(seqs)`` (see :meth:`_backend`)."""
        backend = self._backend()
        if backend is not None:
            return [backend.decode(ids, skip_special_tokens=False) for ids in seqs]
        return self.tokenizer.batch_decode(seqs)

    def _token_ids_containing(self, stop: str) -> list[int]:
        """Every vocabulary token whose text contains ``stop`` (for BPE vocabularies a newline
        often comes fused with other characters)."""
        if stop not in self._stop_ids:
            vocab = self.tokenizer.get_vocab()
            ids = [i for i in vocab.values() if stop in self.tokenizer.decode([i])]
            self._stop_ids[stop] = sorted(ids)
        return self._stop_ids[stop]

    # -- sampling ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        *,
        num_samples: int | Sequence[int] = 1,
        temperature: float = 1.0,
        max_new_tokens: int | Sequence[int] = 64,
        stop: str | None = "\n",
        head_stop: str | None = None,
        unique_heads: bool = False,
        prefix_cache: PrefixCache | None = None,
        park: int = 0,
    ) -> list[list[Sample]]:
        """``num_samples`` continuations of each prompt (greedy when ``temperature == 0``), each
        ended by ``stop`` (kept in the text), end-of-sequence (dropped) or ``max_new_tokens`` (one
        number for all prompts, or one per prompt).
        Returns one list of samples per prompt. Each prompt is run through the model once, for all
        of its ``num_samples`` rows (one number for all prompts, or one per prompt). With
        ``head_stop``, each sample also reports the length and log-probability of its head, the
        part up to the first ``head_stop`` (for example its first line, while it runs on to the end
        of the solution).
        With ``unique_heads`` as well, only the first sample of a prompt to finish a given head
        runs on past it; a later one with the same head stops there (``Sample.duplicate``), as its
        continuation would only repeat a draw from the same distribution.
        With a ``prefix_cache`` (see :meth:`prefix_cache`), a prompt found in it skips its prompt
        pass (only its last token is run), and each sample's prompt extended by its head (with
        ``head_stop``; else by its text, when it ended on ``stop``) is stored in it.
        With ``park > 0``, a batch returns as soon as at most ``park`` of its rows still run and
        each of those has finished its head: they come back parked (``Sample.parked``), their
        text so far (and, with a ``prefix_cache``, the whole context, prompt and text, stored in
        it), to be continued by a later call with more rows to share its decoding steps."""
        if park < 0:
            raise ValueError(f"park must be >= 0, got {park}")
        prompts = list(prompts)
        counts = _per_prompt("num_samples", num_samples, len(prompts), least=1)
        caps = _per_prompt("max_new_tokens", max_new_tokens, len(prompts), least=0)
        entries: list[PrefixEntry | None] = [None] * len(prompts)
        if prefix_cache is not None:
            if prefix_cache.model is not self.model:
                raise ValueError("prefix_cache was made for another model; make one with policy.prefix_cache()")
            entries = [prefix_cache.get(p) for p in prompts]
            for e in entries:  # kept while they are read, even if evicted meanwhile
                if e is not None:
                    prefix_cache.hold(e.tokens)
        try:
            return self._generate(prompts, entries, counts, temperature, caps, stop, head_stop,
                                  unique_heads, prefix_cache, int(park))
        finally:
            for e in entries:
                if e is not None:
                    prefix_cache.release(e.tokens)

    def _generate(self, prompts, entries, counts, temperature, caps, stop, head_stop, unique_heads,
                  prefix_cache, park) -> list[list[Sample]]:
        missing = [i for i, e in enumerate(entries) if e is None]
        encoded = iter(self._encode([prompts[i] for i in missing]) if missing else ())
        ids = [list(e.ids) if e is not None else next(encoded) for e in entries]
        end_ids = set(self._token_ids_containing(stop)) if stop else set()
        if self.eos_id is not None:
            end_ids.add(int(self.eos_id))
        ends = self._token_table(end_ids) if end_ids else None
        heads = self._token_table(self._token_ids_containing(head_stop)) if head_stop else None
        kept_stop = head_stop or stop  # what ends the part of a sample stored with its prompt
        kept_end = None
        if prefix_cache is not None and kept_stop:
            kept_end = heads if head_stop else self._token_table(self._token_ids_containing(stop))
        # longest first, so prompts of similar length share a batch and padding stays small
        order = np.argsort([-len(x) for x in ids], kind="stable")
        results: list[list[Sample]] = [[] for _ in prompts]
        self.model.eval()
        for chunk in self._chunks(order, counts):
            saved: dict = {}
            parked: dict = {}
            rows = counts[chunk]
            owner = np.repeat(np.arange(len(chunk)), rows)  # each row's prompt in the chunk
            limits = caps[chunk]
            decoded = self._decode([ids[i] for i in chunk], counts=rows, max_new_tokens=int(limits.max()),
                                   limits=None if (limits == limits[0]).all() else limits[owner],
                                   temperature=float(temperature), ends=ends, heads=heads,
                                   unique_heads=bool(unique_heads and heads is not None and rows.max() > 1),
                                   prefix_cache=prefix_cache, prefixes=[entries[i] for i in chunk],
                                   kept_end=kept_end, saved=saved, park=park, parked=parked)
            texts = self._texts([toks[:-1] if toks and self.eos_id is not None and toks[-1] == self.eos_id else toks
                                 for toks, *_ in decoded])  # the end-of-sequence token is dropped
            for row, (text, (toks, lp, finished, head_len, head_lp, dup, held)) in enumerate(zip(texts, decoded)):
                if stop and stop in text:
                    text = text[: text.index(stop) + len(stop)]
                texts[row] = text
                results[chunk[owner[row]]].append(Sample(text, lp, len(toks), finished, head_len, head_lp, dup,
                                                         held))
            if saved:  # each row's prompt extended by its kept tokens, keyed by their text
                prefix_cache.keep([(prompts[chunk[owner[r]]], ids[chunk[owner[r]]] + decoded[r][0][:k], texts[r], slots)
                                   for r, (k, slots) in saved.items()], kept_stop, self._texts)
            if parked:  # each parked row's whole context
                prefix_cache.keep_spelled([(prompts[chunk[owner[r]]] + texts[r], ids[chunk[owner[r]]] + decoded[r][0],
                                            slots) for r, slots in parked.items()], self._texts)
        return results

    def _chunks(self, order: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
        """``order`` cut into runs of prompts whose rows (``counts``) fill at most ``batch_size``
        rows (at least one prompt each)."""
        chunks, start, rows = [], 0, 0
        for i, c in enumerate(counts[order].tolist()):
            if i > start and rows + c > self.batch_size:
                chunks.append(order[start:i])
                start, rows = i, 0
            rows += c
        if start < len(order):
            chunks.append(order[start:])
        return chunks

    def prefix_cache(self, max_bytes: int = 1 << 30) -> PrefixCache:
        """A new :class:`engine.kv_cache.PrefixCache` for :meth:`generate` with this model (up to
        ``max_bytes`` of keys and values; valid while the weights stay as they are)."""
        return PrefixCache(self.model, max_bytes)

    def _decode(self, batch: list[list[int]], *, counts: np.ndarray, max_new_tokens: int, temperature: float,
                ends: torch.Tensor | None, heads: torch.Tensor | None = None, unique_heads: bool = False,
                prefix_cache: PrefixCache | None = None, prefixes: list[PrefixEntry | None] | None = None,
                kept_end: torch.Tensor | None = None, saved: dict | None = None, park: int = 0,
                parked: dict | None = None, limits: np.ndarray | None = None
                ) -> list[tuple[list[int], float, bool, int, float, bool, bool]]:
        """Sample ``counts[i]`` continuations of each prompt ``i`` in ``batch`` with a KV cache (the
        rows in prompt order: prompt 0's, then prompt 1's...). Each prompt is run
        through the model once, its keys and values written into each of its rows; the cache is
        written in place into buffers sized for the whole generation (no per-token concatenation),
        reused from one call to the next. Finished rows leave the batch
        (and the cache) once a quarter of the batch has finished, so compute follows the rows still
        running. Tokens and log-probabilities stay on the device until the end. Returns per row:
        token ids, the sum of their log-probabilities at temperature 1, whether it ended on an
        end token, the number of tokens up to the first token in ``heads`` (all when none is,
        or ``heads`` is None) with the sum of their log-probabilities, and whether it was stopped
        after its head for repeating an earlier row's head (``unique_heads``).
        ``prefixes``: per prompt, an entry of ``prefix_cache`` holding its keys and values but the
        last token's, or None; the prompt pass then runs only the positions that no entry covers.
        ``kept_end`` (a token table) and ``saved`` (a dict): each row whose tokens reach one in
        ``kept_end`` (before any end token; rows stopped as repeats excepted) has the keys and
        values of its prompt and tokens up to that one, but the last, copied into ``prefix_cache``
        before it leaves the batch, as ``saved[row] = (tokens kept, pool slots)`` (the slots of
        its prompt's entry are shared, not copied).
        ``limits``: per row, its own ``max_new_tokens`` (at most the one given), or None.
        ``park`` (see :meth:`generate`): the rows still running when the batch returns early come
        back with the last flag set; with a ``prefix_cache``, each one's whole context goes into
        its pools, as ``parked[row] = pool slots`` (sharing its ``saved`` slots)."""
        n0 = len(batch)
        width = max(len(x) for x in batch)
        total = width + max_new_tokens
        lengths = np.fromiter(map(len, batch), np.int64, count=n0)
        filled = np.arange(width) >= width - lengths[:, None]  # left padding
        ids_np = np.full((n0, width), self.pad_id, dtype=np.int64)
        ids_np[filled] = np.fromiter(itertools.chain.from_iterable(batch), np.int64, count=int(lengths.sum()))
        mask0 = torch.ones((n0, total), dtype=torch.long)  # generated positions are always attended to
        mask0[:, :width] = torch.from_numpy(filled)
        input_ids, mask0 = torch.from_numpy(ids_np).to(self.device), mask0.to(self.device)
        positions = (mask0[:, :width].cumsum(-1) - 1).clamp(min=0)
        n = int(counts.sum())
        owner = np.repeat(np.arange(n0), counts)  # each row's prompt
        cache = BufferCache(total, self._arena, int(counts[0]) if (counts == counts[0]).all() else counts)
        window = width  # the positions the prompt pass runs: those no prefix entry covers
        if prefixes is not None and any(e is not None for e in prefixes):
            window = max(1 if e is not None else int(k) for e, k in zip(prefixes, lengths))
            if window < width:
                cache.prefill(n, width - window, prefix_cache, [
                    (i, width - int(k), e, int(k) - window) for i, (e, k) in enumerate(zip(prefixes, lengths))
                    if e is not None and k > window])
        logits = self.model(input_ids=input_ids[:, width - window :], attention_mask=mask0[:, :width],
                            position_ids=positions[:, width - window :], use_cache=True,
                            **{self._cache_kw(): cache}, **self._last_logits_only()).logits[:, -1]
        prompt_row = torch.from_numpy(owner).to(self.device)
        logits, mask, next_pos = logits[prompt_row], self._step_mask(mask0)[prompt_row], positions[prompt_row, -1] + 1
        first = torch.from_numpy(width - lengths).to(self.device)[prompt_row]  # each row's first real position
        cap = max(max_new_tokens, 1)
        rows = torch.arange(n, device=self.device)  # original row of each batch position
        out_tok = torch.zeros((n, cap), dtype=torch.long, device=self.device)
        out_lp = torch.zeros((n, cap), dtype=torch.float32, device=self.device)
        alive = torch.ones((n, 1), dtype=torch.bool, device=self.device)
        pos = next_pos[:, None]
        cache_kw = self._cache_kw()
        # Each step's tokens and log-probabilities are kept as they come, per batch position; they
        # go to their rows' places in out_tok / out_lp once per segment (the steps between two
        # changes of the batch's rows), not once per step: on CPU each tensor operation costs
        # several microseconds whatever its size, and a step should take few of them.
        seg_tok: list[torch.Tensor] = []
        seg_lp: list[torch.Tensor] = []
        seg_start = steps = 0
        # unique_heads: a rolling hash of each row's head while it is open; (prompt, hash) of the
        # heads finished so far; the rows stopped as repeats, with their lengths
        head_hash = torch.zeros((n, 1), dtype=torch.long, device=self.device)
        head_open = torch.ones((n, 1), dtype=torch.bool, device=self.device)
        any_open = unique_heads
        seen: set[tuple[int, int]] = set()
        repeats_cut: dict[int, int] = {}
        held: set[int] = set()  # rows parked
        capped: dict[int, np.ndarray] = {}  # step -> the rows whose own limit it is
        if limits is not None:
            for k in np.unique(limits[limits < max_new_tokens]).tolist():  # a limit of 0 stops after one step
                capped[max(k, 1)] = np.concatenate([capped.get(max(k, 1), np.zeros(0, np.int64)),
                                                    np.flatnonzero(limits == k)])

        def flush():
            if seg_tok:
                out_tok[rows, seg_start:steps] = torch.cat(seg_tok, 1)
                out_lp[rows, seg_start:steps] = torch.cat(seg_lp, 1)
                seg_tok.clear()
                seg_lp.clear()

        # On the CPU one numba kernel does a step's bookkeeping in place (see engine.sampling),
        # writing tokens straight into out_tok / out_lp; the tensor form keeps them per segment.
        fused = self.fused_cpu_step and self.device.type == "cpu"
        if fused:
            vocab_tables = [(t.numpy() if t is not None else np.zeros(0, np.bool_)) for t in (ends, heads)]
            out_np = out_tok.numpy(), out_lp.numpy()
            inv_temperature = 1.0 / temperature if temperature > 0 else 0.0
            tok_buf = torch.empty((n, 1), dtype=torch.long)
            tok_np = tok_buf.numpy()  # the kernel writes the first len(rows) rows
            closing = np.zeros(n, np.bool_)
            no_draws = np.zeros(0)

            def row_views():
                """The step's token tensor and NumPy views of the per-row state (they change only
                when rows leave)."""
                return tok_buf[: len(rows)], rows.numpy(), alive.numpy(), head_open.numpy(), head_hash.numpy()

            tok, *views = row_views()

        storing = kept_end is not None and prefix_cache is not None  # contexts go into the prefix cache
        if storing:
            kept_np = kept_end.cpu().numpy()
            ends_np = ends.cpu().numpy() if ends is not None else None

        def save(at: torch.Tensor) -> None:
            """Copy out the keys and values kept from the rows at batch positions ``at`` (see
            ``saved`` above), before they are overwritten."""
            if steps == 0:  # nothing generated (max_new_tokens=0)
                return
            at_np = at.cpu().numpy()
            row_np = rows.cpu().numpy()[at_np]
            new = [j for j, r in enumerate(row_np.tolist()) if r not in saved and r not in repeats_cut]
            if not new:
                return
            at_np, row_np = at_np[new], row_np[new]
            toks = out_tok[torch.from_numpy(row_np).to(self.device), :steps].cpu().numpy()
            kept = prefix_cache.store_rows(cache, at_np, toks, kept_np, ends_np, first.cpu().numpy()[at_np], width,
                                           [prefixes[owner[r]] if prefixes else None for r in row_np.tolist()],
                                           None if limits is None else limits[row_np])
            saved.update((r, k) for r, k in zip(row_np.tolist(), kept) if k is not None)

        def judge(at: list[int], at_rows: list[int], hashes: list[int]) -> list[int]:
            """Of the rows whose heads just closed, those whose head repeats an earlier one of the
            same prompt (a hash collision only costs a rollout sampled later)."""
            cut = []
            for i, r, h in zip(at, at_rows, hashes):
                if (owner[r], h) in seen:
                    cut.append(i)
                    repeats_cut[r] = steps
                else:
                    seen.add((owner[r], h))
            return cut

        for t in range(max_new_tokens):
            steps = t + 1
            if fused:
                u = torch.rand(len(rows)).numpy() if temperature > 0 else no_draws
                rows_np, alive_np, open_np, hash_np = views
                n_alive, n_closing = decode_step(logits.float().numpy(), u, inv_temperature, rows_np, t, *out_np,
                                                 alive_np, *vocab_tables, open_np, hash_np, any_open, tok_np, closing)
                if n_closing:
                    at = np.flatnonzero(closing)
                    closing[at] = False
                    cut = judge(at.tolist(), rows_np[at].tolist(), hash_np[at, 0].tolist())
                    if cut:
                        n_alive -= int(alive_np[cut, 0].sum())
                        alive_np[cut] = False
                    any_open = bool((open_np & alive_np).any())
            else:
                logp = torch.log_softmax(logits.float(), dim=-1)
                if temperature <= 0:
                    tok = logp.argmax(-1, keepdim=True)
                else:
                    tok = sample_inverse_cdf(logp.exp() if temperature == 1.0
                                             else torch.softmax(logits.float() / temperature, dim=-1))
                seg_tok.append(tok)
                seg_lp.append(logp.gather(1, tok))
                if any_open:
                    head_hash = torch.where(head_open, head_hash * HASH_BASE + tok, head_hash)
                    closing = head_open & alive & heads[tok]  # a finished row riding along is not judged
                    if bool(closing.any()):
                        head_open &= ~closing
                        at = torch.nonzero(closing[:, 0])[:, 0]
                        cut = judge(at.tolist(), rows[at].tolist(), head_hash[at, 0].tolist())
                        if cut:
                            alive[cut] = False
                        any_open = bool((head_open & alive).any())
                if ends is not None:
                    alive &= ~ends[tok]
            if limits is not None and steps in capped:  # rows at their own max_new_tokens stop
                at = np.flatnonzero(np.isin(rows.cpu().numpy(), capped[steps]))
                if fused:
                    n_alive -= int(alive_np[at, 0].sum())
                alive[torch.from_numpy(at).to(self.device)] = False
            if ends is not None or repeats_cut or limits is not None:
                if not fused:  # the kernel counts them
                    n_alive = int(alive.sum())
                if n_alive == 0:
                    break
                if park and n_alive <= park and steps < max_new_tokens:  # (not at the cap: they are done)
                    flush()
                    seg_start = steps
                    live = rows[alive[:, 0]]
                    if heads is None or bool(heads[out_tok[live, :steps]].any(1).all()):
                        held = set(live.tolist())  # parked: they go on in a later call
                        break
                # Finished rows ride along (their tokens are ignored) until a quarter of the batch
                # has finished; then they leave it and the cache. A decoding step's cost grows with
                # its rows (about 0.06 ms a row for the tiny default model on 2 CPU cores, 2 ms
                # fixed), and the cache copy costs about one step's worth, so it pays for itself
                # within a step or two.
                if n_alive * 4 <= len(rows) * 3:
                    flush()
                    seg_start = steps
                    if storing:
                        save(torch.nonzero(~alive[:, 0])[:, 0])
                    keep = cache.drop_rows(alive[:, 0], first)
                    rows, tok, mask, pos, alive = rows[keep], tok[keep], mask[keep], pos[keep], alive[keep]
                    first = first[keep]
                    head_hash, head_open = head_hash[keep], head_open[keep]
                    if fused:  # the kept rows' tokens go back into the buffer the kernel writes
                        tok_buf[: len(rows)] = tok
                        tok, *views = row_views()
            if t == max_new_tokens - 1:
                break
            logits = self.model(input_ids=tok, attention_mask=mask[..., : width + t + 1], position_ids=pos,
                                use_cache=True, **{cache_kw: cache}).logits[:, -1]
            pos = pos + 1
        flush()
        if storing:
            save(torch.arange(len(rows), device=self.device))
        if held and prefix_cache is not None and parked is not None and steps:
            at = torch.nonzero(alive[:, 0])[:, 0].cpu().numpy()
            starts, shared, saved = [], [], saved or {}
            for r, f in zip(rows.cpu().numpy()[at].tolist(), first.cpu().numpy()[at].tolist()):
                if r in saved:  # continue the stored head: positions after its last but one token
                    starts.append(width + saved[r][0] - 1)
                    shared.append(saved[r][1])
                elif prefixes and prefixes[owner[r]] is not None:
                    starts.append(width - 1)
                    shared.append(prefixes[owner[r]].tokens)
                else:
                    starts.append(f)
                    shared.append(np.zeros(0, np.int64))
            starts = np.array(starts, np.int64)
            slots = prefix_cache.store(cache, at, starts, width + steps - 1 - starts, shared)
            parked.update((r, k) for r, k in zip(rows.cpu().numpy()[at].tolist(), slots) if k is not None)
        # Lengths come from the tokens: a row ends at its first end token (what follows it, from
        # a finished row riding along, is ignored), else at the last step.
        position = torch.arange(cap, device=self.device)[None, :]

        def through_first(table, within, otherwise):
            """Per row: whether a token in ``table`` occurs where ``within``, and the length up to
            and including the first one (``otherwise`` where none does)."""
            hit = table[out_tok] & within
            found = hit.any(1)
            return found, torch.where(found, hit.byte().argmax(1) + 1, otherwise)  # argmax: the first True

        length = torch.full((n,), steps, dtype=torch.long, device=self.device)
        if limits is not None:  # a row stopped at its own limit; what it sampled after, riding along, is ignored
            length = torch.clamp(torch.from_numpy(limits).to(self.device), max=steps)
        ended = torch.zeros(n, dtype=torch.bool, device=self.device)
        if ends is not None:
            ended, length = through_first(ends, position < length[:, None], length)
        if repeats_cut:  # rows stopped after a repeated head end there, unfinished
            cut_rows = torch.tensor(list(repeats_cut), dtype=torch.long, device=self.device)
            length[cut_rows] = torch.tensor(list(repeats_cut.values()), dtype=torch.long, device=self.device)
            ended[cut_rows] = False
        keep_lp = position < length[:, None]
        sums = (out_lp * keep_lp).sum(-1, dtype=torch.float64).tolist()
        head, head_sums = length, sums
        if heads is not None:  # up to the first head token, else the whole row
            _, head = through_first(heads, keep_lp, length)
            head_sums = (out_lp * (position < head[:, None])).sum(-1, dtype=torch.float64).tolist()
        toks = out_tok[:, :steps].tolist()
        return [(toks[r][:k], sums[r], e, h, head_sums[r], r in repeats_cut, r in held)
                for r, (k, e, h) in enumerate(zip(length.tolist(), ended.tolist(), head.tolist()))]

    def _token_table(self, ids) -> torch.Tensor:
        """A boolean lookup table over the vocabulary, True at ``ids``: ``table[tokens]`` marks
        the tokens in a batch with one indexing operation."""
        size = max(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", 0) or 0), max(ids, default=0) + 1)
        table = torch.zeros(size, dtype=torch.bool, device=self.device)
        table[torch.tensor(sorted(ids), dtype=torch.long, device=self.device)] = True
        return table

    def _step_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of the decoding steps, from the ``[rows, positions]`` 0/1 ``mask``:
        for the ``sdpa`` and ``eager`` attention implementations of a model with full attention in
        every layer (of a type listed in ``_MASK_AS_GIVEN``), the ``[rows, 1, 1, positions]`` mask
        they use (boolean, and additive with the dtype's minimum, as ``transformers`` builds them),
        so that a step's forward pass takes a slice of it as it is instead of building it anew from
        the 2-D mask (with one query per row, the causal part masks nothing); otherwise the 2-D
        mask itself (a sliding window or attention chunks are applied through the mask that
        transformers builds, and ALiBi models build their bias from the 2-D mask), as also when no
        row is padded (transformers then passes no mask, which lets ``sdpa`` keep grouped key and
        value heads grouped). Either is sliced as ``mask[..., :length]``."""
        config = self.model.config
        full_attention = (getattr(config, "model_type", None) in _MASK_AS_GIVEN
                          and getattr(config, "sliding_window", None) is None
                          and getattr(config, "attention_chunk_size", None) is None
                          and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ()))
        if not full_attention:  # a window, chunks or a bias built from the 2-D mask (ALiBi) need the 2-D mask
            return mask
        if bool(mask.all()):  # no padding: transformers passes no mask at all (grouped KV heads stay grouped)
            return mask
        impl = getattr(config, "_attn_implementation", None)
        if impl == "sdpa":
            return mask.bool()[:, None, None, :]
        if impl == "eager":
            dtype = self.model.dtype
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                mask == 0, torch.finfo(dtype).min)[:, None, None, :]
        return mask

    def _forward_takes(self, name: str) -> bool:
        """Whether the model's forward has a parameter ``name`` (its signature read once)."""
        if not hasattr(self, "_forward_params"):
            self._forward_params = frozenset(inspect.signature(self.model.forward).parameters)
        return name in self._forward_params

    def _last_logits_only(self) -> dict:
        """``logits_to_keep=1`` where the model's forward takes it: a prompt pass needs the
        logits of the last position only (for a large vocabulary, those of every position can
        take more memory than the whole cache)."""
        return {"logits_to_keep": 1} if self._forward_takes("logits_to_keep") else {}

    def _cache_kw(self) -> str:
        """transformers >= 5.x names the forward's cache argument ``cache``; older releases
        ``past_key_values``."""
        return "cache" if self._forward_takes("cache") else "past_key_values"

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def logprobs(self, prompts: list[str], continuations: list[str]) -> np.ndarray:
        """Summed log-probability of each continuation given its prompt, shape ``[len(prompts)]``."""
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations must have the same length")
        p_ids, c_ids = self._encode(prompts), self._encode(continuations)
        out = np.zeros(len(prompts))
        self.model.eval()
        for start in range(0, len(prompts), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(prompts)))
            seqs = [p_ids[i] + c_ids[i] for i in rows]
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for r, s in enumerate(seqs):
                input_ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
            for r, i in enumerate(rows):
                a, b = len(p_ids[i]), len(p_ids[i]) + len(c_ids[i])
                out[i] = float(logp[r, a - 1 : b - 1].sum())
        return out
