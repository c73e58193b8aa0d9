"""Policies: sample continuations with their log-probabilities, and score given continuations.

:class:`TransformersPolicy` wraps any local causal LM that ``transformers`` can load (CPU or GPU).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention import ATTENTION, decoding_attention_for
from engine.decoding import decode
from engine.kv_cache import Arena
from engine.prefix_cache import PoolMemory, PrefixCache, PrefixEntry

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
    given = np.asarray(value)
    if given.dtype.kind not in "iu" or given.ndim > 1:
        raise ValueError(f"{name} must be a whole number or a list of whole numbers (one per prompt), got {value!r}")
    out = np.full(prompts, value, np.int64) if given.ndim == 0 else given.astype(np.int64)
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
        self._pool_memory = PoolMemory()  # prefix-cache pool memory, handed from one cache to the next
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
        if not isinstance(park, (int, np.integer)) or park < 0:
            raise ValueError(f"park must be a whole number >= 0, got {park!r}")
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
        self._eval_mode()
        for chunk in self._chunks(order, counts):
            saved: dict = {}
            parked: dict = {}
            rows = counts[chunk]
            owner = np.repeat(np.arange(len(chunk)), rows)  # each row's prompt in the chunk
            limits = caps[chunk]
            with decoding_attention_for(self.model):  # on the CPU, steps attend by engine.attention
                decoded = decode(self, [ids[i] for i in chunk], counts=rows, max_new_tokens=int(limits.max()),
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

    def _eval_mode(self) -> None:
        """``model.eval()`` unless every module is in eval mode already (a trainer may have left it in
        training mode; checking costs a third of setting, ~50 us against ~160 us for the default model)."""
        if any(m.training for m in self.model.modules()):
            self.model.eval()

    def prefix_cache(self, max_bytes: int = 1 << 30) -> PrefixCache:
        """A new :class:`engine.prefix_cache.PrefixCache` for :meth:`generate` with this model (up to
        ``max_bytes`` of keys and values; valid while the weights stay as they are). On the CPU its
        pools take the memory of the policy's previous cache once that one is gone (see
        :class:`engine.prefix_cache.PoolMemory`): the policy keeps the pages written by its
        largest search mapped, as it does those of its KV-cache arena."""
        return PrefixCache(self.model, max_bytes, self._pool_memory)

    def _token_table(self, ids) -> torch.Tensor:
        """A boolean lookup table over the vocabulary, True at ``ids``: ``table[tokens]`` marks
        the tokens in a batch with one indexing operation."""
        size = max(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", 0) or 0), max(ids, default=0) + 1)
        table = torch.zeros(size, dtype=torch.bool, device=self.device)
        table[torch.tensor(sorted(ids), dtype=torch.long, device=self.device)] = True
        return table

    def _step_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of the decoding steps, from the ``[rows, positions]`` 0/1 ``mask``:
        for the ``sdpa``, ``eager`` and :data:`engine.attention.ATTENTION` attention implementations
        of a model with full attention in every layer (of a type listed in ``_MASK_AS_GIVEN``), the
        ``[rows, 1, 1, positions]`` mask they use (boolean for ``sdpa``; additive with the dtype's
        minimum for the others, as ``transformers`` builds it for ``eager``),
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
        if impl in ("eager", ATTENTION):  # (added to the scores in one operation)
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
        self._eval_mode()
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
