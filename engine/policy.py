"""Policies: sample continuations with their log-probabilities, and score given continuations.

:class:`TransformersPolicy` wraps any local causal LM that ``transformers`` can load (CPU or GPU).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Sample", "TransformersPolicy"]


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
        Returns one list of samples per prompt."""
        flat = [p for p in prompts for _ in range(num_samples)]
        ids = self._encode(flat)
        end_ids = set(self._token_ids_containing(stop)) if stop else set()
        if self.eos_id is not None:
            end_ids.add(int(self.eos_id))
        ends = torch.tensor(sorted(end_ids), dtype=torch.long, device=self.device) if end_ids else None
        # longest first, so rows of similar length share a batch and padding stays small
        order = np.argsort([-len(x) for x in ids], kind="stable")
        results: list[Sample | None] = [None] * len(flat)
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            decoded = self._decode([ids[i] for i in chunk], max_new_tokens=int(max_new_tokens),
                                   temperature=float(temperature), ends=ends)
            for i, (toks, lps, finished) in zip(chunk, decoded):
                if toks and self.eos_id is not None and toks[-1] == self.eos_id:
                    text = self.tokenizer.decode(toks[:-1])
                else:
                    text = self.tokenizer.decode(toks)
                if stop and stop in text:
                    text = text[: text.index(stop) + len(stop)]
                results[i] = Sample(text, float(sum(lps)), len(toks), finished)
        return [results[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

    def _decode(self, batch: list[list[int]], *, max_new_tokens: int, temperature: float,
                ends: torch.Tensor | None) -> list[tuple[list[int], list[float], bool]]:
        """Sample with a KV cache, dropping finished rows from the batch (and from the cache) once half
        of them have ended, so that compute follows the rows still running rather than the longest.
        Returns per row: token ids, their log-probabilities at temperature 1, and whether it ended on
        an end token."""
        from transformers import DynamicCache

        n = len(batch)
        width = max(len(x) for x in batch)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, x in enumerate(batch):
            input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
            mask[r, width - len(x) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        # transformers >= 5.x names the argument `cache`; older releases `past_key_values`
        cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{cache_kw: cache}).logits[:, -1]
        next_pos = positions[:, -1] + 1
        rows = list(range(n))  # original row of each batch position
        alive = torch.ones(n, dtype=torch.bool, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        finished = [False] * n
        for t in range(max_new_tokens):
            logp = torch.log_softmax(logits.float(), dim=-1)
            if temperature > 0:
                tok = torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1)[:, 0]
            else:
                tok = logp.argmax(-1)
            tok_lp = logp.gather(1, tok[:, None])[:, 0]
            live = alive.tolist()
            for r, tk, lp, ok in zip(rows, tok.tolist(), tok_lp.tolist(), live):
                if ok:
                    tokens[r].append(tk)
                    logps[r].append(lp)
            if t == max_new_tokens - 1:
                break
            if ends is not None:
                done = torch.isin(tok, ends) & alive
                if bool(done.any()):
                    for j in torch.nonzero(done)[:, 0].tolist():
                        finished[rows[j]] = True
                    alive &= ~done
                    n_alive = int(alive.sum())
                    if n_alive == 0:
                        break
                    # Finished rows ride along (their tokens are ignored) until half the batch has
                    # finished: a forward pass costs little per extra row, a cache copy does not.
                    if n_alive * 2 <= len(rows):
                        keep = torch.nonzero(alive)[:, 0]
                        rows = [rows[j] for j in keep.tolist()]
                        tok, mask, next_pos, alive = tok[keep], mask[keep], next_pos[keep], alive[keep]
                        cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            logits = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                use_cache=True, **{cache_kw: cache}).logits[:, -1]
            next_pos = next_pos + 1
        if ends is not None:  # a row whose last token ended it, at the cap, is finished too
            end_set = set(ends.tolist())
            for r in range(n):
                if tokens[r] and tokens[r][-1] in end_set:
                    finished[r] = True
        return list(zip(tokens, logps, finished))

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
