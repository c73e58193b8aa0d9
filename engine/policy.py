"""Policies: sample continuations with their log-probabilities, and score given continuations.

:class:`TransformersPolicy` wraps any local causal LM that ``transformers`` can load (CPU or GPU).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = ["Sample", "TransformersPolicy"]


class _Arena:
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


class _BufferLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes new keys and values in place into a buffer sized for the whole
    generation, instead of concatenating (which copies the whole cache at every token). Dropping or
    repeating rows copies into the other of two buffers that take turns. ``keys``/``values`` are
    views of the filled part."""

    def __init__(self, capacity: int, arena: _Arena, index: int):
        super().__init__()
        self.capacity, self.arena, self.index = int(capacity), arena, index
        self.length = 0
        self.side = 0

    def _buffers(self, side: int, rows: int, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int):
        k = self.arena.tensor((self.index, "k", side), (rows, like_k.shape[1], capacity, like_k.shape[-1]), like_k)
        v = self.arena.tensor((self.index, "v", side), (rows, like_v.shape[1], capacity, like_v.shape[-1]), like_v)
        return k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.device = key_states.device
            self._k, self._v = self._buffers(0, key_states.shape[0], key_states, value_states, self.capacity)
            self.is_initialized = True
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
        if self.is_initialized:
            side = 1 - self.side
            k, v = self._buffers(side, len(indices), self._k, self._v, self._k.shape[2])
            torch.index_select(self._k, 0, indices, out=k)
            torch.index_select(self._v, 0, indices, out=v)
            self._k, self._v, self.side = k, v, side
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.batch_select_indices(torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats))


class _BufferCache(DynamicCache):
    """A ``DynamicCache`` made of :class:`_BufferLayer` s of ``capacity`` positions in ``arena``."""

    def __init__(self, capacity: int, arena: _Arena):
        Cache.__init__(self, layer_class_to_replicate=lambda: _BufferLayer(capacity, arena, len(self.layers)))


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
        self._arena = _Arena()  # KV-cache memory reused across generate calls

    # -- helpers -------------------------------------------------------------------------------
    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

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
        num_samples: int = 1,
        temperature: float = 1.0,
        max_new_tokens: int = 64,
        stop: str | None = "\n",
    ) -> list[list[Sample]]:
        """``num_samples`` continuations of each prompt (greedy when ``temperature == 0``), each
        ended by ``stop`` (kept in the text), end-of-sequence (dropped) or ``max_new_tokens``.
        Returns one list of samples per prompt. Each prompt is run through the model once; its
        cache is then copied for its ``num_samples`` rows."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        ids = self._encode(list(prompts))
        end_ids = set(self._token_ids_containing(stop)) if stop else set()
        if self.eos_id is not None:
            end_ids.add(int(self.eos_id))
        ends = torch.tensor(sorted(end_ids), dtype=torch.long, device=self.device) if end_ids else None
        # longest first, so prompts of similar length share a batch and padding stays small
        order = np.argsort([-len(x) for x in ids], kind="stable")
        per_batch = max(1, self.batch_size // num_samples)
        results: list[list[Sample]] = [[] for _ in prompts]
        self.model.eval()
        for start in range(0, len(order), per_batch):
            chunk = order[start : start + per_batch]
            decoded = self._decode([ids[i] for i in chunk], repeats=num_samples,
                                   max_new_tokens=int(max_new_tokens), temperature=float(temperature), ends=ends)
            for row, (toks, lp, finished) in enumerate(decoded):
                if toks and self.eos_id is not None and toks[-1] == self.eos_id:
                    text = self.tokenizer.decode(toks[:-1])
                else:
                    text = self.tokenizer.decode(toks)
                if stop and stop in text:
                    text = text[: text.index(stop) + len(stop)]
                results[chunk[row // num_samples]].append(Sample(text, lp, len(toks), finished))
        return results

    def _decode(self, batch: list[list[int]], *, repeats: int, max_new_tokens: int, temperature: float,
                ends: torch.Tensor | None) -> list[tuple[list[int], float, bool]]:
        """Sample ``repeats`` continuations of each prompt in ``batch`` with a KV cache (rows
        ``i * repeats ... i * repeats + repeats - 1`` continue prompt ``i``). The prompts are run
        through the model once and the cache is copied per row; it is written in place into buffers
        sized for the whole generation (no per-token concatenation). Finished rows leave the batch
        (and the cache) once half of the batch has finished, so compute follows the rows still
        running. Tokens and log-probabilities stay on the device until the end. Returns per row:
        token ids, the sum of their log-probabilities at temperature 1, and whether it ended on an
        end token."""
        n0 = len(batch)
        width = max(len(x) for x in batch)
        total = width + max_new_tokens
        mask0 = torch.zeros((n0, total), dtype=torch.long)
        input_ids = torch.full((n0, width), self.pad_id, dtype=torch.long)
        for r, x in enumerate(batch):
            input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask0[r, width - len(x) :] = 1  # generated positions are always attended to
        input_ids, mask0 = input_ids.to(self.device), mask0.to(self.device)
        positions = (mask0[:, :width].cumsum(-1) - 1).clamp(min=0)
        cache = _BufferCache(total, self._arena)
        logits = self.model(input_ids=input_ids, attention_mask=mask0[:, :width], position_ids=positions,
                            use_cache=True, **{self._cache_kw(): cache}).logits[:, -1]
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
        prompt_row = torch.arange(n0, device=self.device).repeat_interleave(repeats)
        logits, mask, next_pos = logits[prompt_row], mask0[prompt_row], positions[prompt_row, -1] + 1
        n = n0 * repeats
        rows = torch.arange(n, device=self.device)  # original row of each batch position
        out_tok = torch.zeros((n, max(max_new_tokens, 1)), dtype=torch.long, device=self.device)
        out_lp = torch.zeros((n, max(max_new_tokens, 1)), dtype=torch.float32, device=self.device)
        length = torch.full((n,), max_new_tokens, dtype=torch.long, device=self.device)
        ended = torch.zeros(n, dtype=torch.bool, device=self.device)
        alive = torch.ones(n, dtype=torch.bool, device=self.device)
        steps = 0
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)
            if temperature <= 0:
                tok = logp.argmax(-1)
            elif temperature == 1.0:
                tok = torch.multinomial(logp.exp(), 1)[:, 0]
            else:
                tok = torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1)[:, 0]
            out_tok[rows, t] = tok
            out_lp[rows, t] = logp.gather(1, tok[:, None])[:, 0]
            steps = t + 1
            if ends is not None:
                done = torch.isin(tok, ends) & alive
                if bool(done.any()):
                    ended[rows[done]] = True
                    length[rows[done]] = t + 1
                    alive &= ~done
                    n_alive = int(alive.sum())
                    if n_alive == 0:
                        break
                    # Finished rows ride along (their tokens are ignored) until half the batch has
                    # finished: an extra row costs a forward pass little, a cache copy more.
                    if n_alive * 2 <= len(rows):
                        keep = torch.nonzero(alive)[:, 0]
                        rows, tok, mask, next_pos = rows[keep], tok[keep], mask[keep], next_pos[keep]
                        alive = alive[keep]
                        cache.batch_select_indices(keep)
            if t == max_new_tokens - 1:
                break
            logits = self.model(input_ids=tok[:, None], attention_mask=mask[:, : width + t + 1],
                                position_ids=next_pos[:, None], use_cache=True,
                                **{self._cache_kw(): cache}).logits[:, -1]
            next_pos = next_pos + 1
        length = torch.minimum(length, torch.tensor(steps, device=self.device))
        keep_lp = torch.arange(out_lp.shape[1], device=self.device)[None, :] < length[:, None]
        sums = (out_lp * keep_lp).sum(-1, dtype=torch.float64).tolist()
        if ends is not None:  # a row whose last token ended it, at the cap, is finished too
            last = out_tok.gather(1, (length - 1).clamp(min=0)[:, None])[:, 0]
            ended |= (length > 0) & torch.isin(last, ends)
        toks = out_tok.tolist()
        return [(toks[r][:k], sums[r], e) for r, (k, e) in enumerate(zip(length.tolist(), ended.tolist()))]

    def _cache_kw(self) -> str:
        """transformers >= 5.x names the forward's cache argument ``cache``; older releases
        ``past_key_values``."""
        if not hasattr(self, "_cache_kw_name"):
            params = inspect.signature(self.model.forward).parameters
            self._cache_kw_name = "cache" if "cache" in params else "past_key_values"
        return self._cache_kw_name

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
