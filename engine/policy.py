"""Policies: sample continuations with their log-probabilities, and score given continuations.

:class:`TransformersPolicy` wraps any local causal LM that ``transformers`` can load (CPU or GPU).
"""

from __future__ import annotations

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
        stop_ids = set(self._token_ids_containing(stop)) if stop else set()
        end_ids = set(stop_ids)
        if self.eos_id is not None:
            end_ids.add(int(self.eos_id))
        order = np.argsort([-len(x) for x in ids], kind="stable")
        results: list[Sample | None] = [None] * len(flat)
        self.model.eval()
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = [ids[i] for i in chunk]
            width = max(len(x) for x in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, x in enumerate(batch):
                input_ids[r, width - len(x) :] = torch.tensor(x, dtype=torch.long)
                mask[r, width - len(x) :] = 1
            sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=int(max_new_tokens),
                eos_token_id=sorted(end_ids) or None,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=True,
                **(sampling if temperature > 0 else dict(do_sample=False)),
            )
            new = out.sequences[:, width:].cpu()
            logits = torch.stack(out.logits, dim=1).float().cpu()  # [b, T, V]
            logp = torch.log_softmax(logits, dim=-1).gather(-1, new[:, : logits.shape[1], None])[..., 0]
            for r, i in enumerate(chunk):
                toks = new[r].tolist()
                n = len(toks)
                finished = False
                for t, tok in enumerate(toks):
                    if tok in end_ids:
                        n = t + 1
                        finished = True
                        break
                keep = toks[:n]
                if keep and self.eos_id is not None and keep[-1] == self.eos_id:
                    text = self.tokenizer.decode(keep[:-1])
                else:
                    text = self.tokenizer.decode(keep)
                if stop and stop in text:
                    text = text[: text.index(stop) + len(stop)]
                results[i] = Sample(text, float(logp[r, :n].sum()), n, finished)
        return [results[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]

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
