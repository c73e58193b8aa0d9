"""The decoding loop behind :meth:`engine.policy.TransformersPolicy.generate`: one prompt pass,
then one forward pass per token for every row still running, with the rows' bookkeeping between
(on the CPU one numba kernel a step, :func:`engine.sampling.decode_step`), finished rows leaving
the batch and its KV cache, and the contexts kept in a prefix cache copied out before their rows
leave."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from engine.kv_cache import BufferCache
from engine.prefix_cache import PrefixCache, PrefixEntry
from engine.sampling import HASH_BASE, decode_step, sample_inverse_cdf

__all__ = ["DRAW_BLOCK", "decode"]

DRAW_BLOCK = 32
"""Decoding steps whose uniform draws are drawn together (see :func:`decode`)."""


def decode(policy, batch: list[list[int]], *, counts: np.ndarray, max_new_tokens: int, temperature: float,
           ends: torch.Tensor | None, heads: torch.Tensor | None = None, unique_heads: bool = False,
           prefix_cache: PrefixCache | None = None, prefixes: list[PrefixEntry | None] | None = None,
           kept_end: torch.Tensor | None = None, saved: dict | None = None, park: int = 0,
           parked: dict | None = None, limits: np.ndarray | None = None
           ) -> list[tuple[list[int], float, bool, int, float, bool, bool]]:
    """Sample ``counts[i]`` continuations of each prompt ``i`` in ``batch`` (token ids) with
    ``policy``'s model (a :class:`engine.policy.TransformersPolicy`) and a KV cache (the rows in
    prompt order: prompt 0's, then prompt 1's...). Each prompt is run
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
    ids_np = np.full((n0, width), policy.pad_id, dtype=np.int64)
    ids_np[filled] = np.fromiter(itertools.chain.from_iterable(batch), np.int64, count=int(lengths.sum()))
    mask0 = torch.ones((n0, total), dtype=torch.long)  # generated positions are always attended to
    mask0[:, :width] = torch.from_numpy(filled)
    input_ids, mask0 = torch.from_numpy(ids_np).to(policy.device), mask0.to(policy.device)
    positions = (mask0[:, :width].cumsum(-1) - 1).clamp(min=0)
    n = int(counts.sum())
    owner = np.repeat(np.arange(n0), counts)  # each row's prompt
    cache = BufferCache(total, policy._arena, int(counts[0]) if (counts == counts[0]).all() else counts)
    window = width  # the positions the prompt pass runs: those no prefix entry covers
    if prefixes is not None and any(e is not None for e in prefixes):
        window = max(1 if e is not None else int(k) for e, k in zip(prefixes, lengths))
        if window < width:
            cache.prefill(n, width - window, prefix_cache, [
                (i, width - int(k), e, int(k) - window) for i, (e, k) in enumerate(zip(prefixes, lengths))
                if e is not None and k > window])
    logits = policy.model(input_ids=input_ids[:, width - window :], attention_mask=mask0[:, :width],
                        position_ids=positions[:, width - window :], use_cache=True,
                        **{policy._cache_kw(): cache}, **policy._last_logits_only()).logits[:, -1]
    prompt_row = torch.from_numpy(owner).to(policy.device)
    logits, mask, next_pos = logits[prompt_row], policy._step_mask(mask0)[prompt_row], positions[prompt_row, -1] + 1
    first = (width - lengths)[owner]  # each row's first real position (on the host: see BufferCache.drop_rows)
    cap = max(max_new_tokens, 1)
    rows = torch.arange(n, device=policy.device)  # original row of each batch position
    out_tok = torch.zeros((n, cap), dtype=torch.long, device=policy.device)
    out_lp = torch.zeros((n, cap), dtype=torch.float32, device=policy.device)
    alive = torch.ones((n, 1), dtype=torch.bool, device=policy.device)
    pos = next_pos[:, None]
    cache_kw = policy._cache_kw()
    # Each step's tokens and log-probabilities are kept as they come, per batch position; they
    # go to their rows' places in out_tok / out_lp once per segment (the steps between two
    # changes of the batch's rows), not once per step: on CPU each tensor operation costs
    # several microseconds whatever its size, and a step should take few of them.
    seg_tok: list[torch.Tensor] = []
    seg_lp: list[torch.Tensor] = []
    seg_start = steps = 0
    # unique_heads: a rolling hash of each row's head while it is open; (prompt, hash) of the
    # heads finished so far; the rows stopped as repeats, with their lengths
    head_hash = torch.zeros((n, 1), dtype=torch.long, device=policy.device)
    head_open = torch.ones((n, 1), dtype=torch.bool, device=policy.device)
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
    fused = policy.fused_cpu_step and policy.device.type == "cpu"
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

    def save(at_np: np.ndarray) -> None:
        """Copy out the keys and values kept from the rows at batch positions ``at_np`` (see
        ``saved`` above), before they are overwritten."""
        if steps == 0:  # nothing generated (max_new_tokens=0)
            return
        row_np = rows.cpu().numpy()[at_np]
        new = [j for j, r in enumerate(row_np.tolist()) if r not in saved and r not in repeats_cut]
        if not new:
            return
        at_np, row_np = at_np[new], row_np[new]
        toks = out_tok[torch.from_numpy(row_np).to(policy.device), :steps].cpu().numpy()
        kept = prefix_cache.store_rows(cache, at_np, toks, kept_np, ends_np, first[at_np], width,
                                       [prefixes[owner[r]] if prefixes else None for r in row_np.tolist()],
                                       None if limits is None else limits[row_np])
        saved.update((r, k) for r, k in zip(row_np.tolist(), kept) if k is not None)

    def judge(at: list[int], at_rows: list[int], hashes: list[int]) -> list[int]:
        """Of the rows whose heads just closed, those whose head repeats an earlier one of the
        same prompt (a hash collision only costs a rollout sampled later)."""
        cut = []
        for i, r, h in zip(at, at_rows, hashes):
            if limits is not None and limits[r] < steps:  # past its own cap (riding along): not a sample
                continue
            if (owner[r], h) in seen:
                cut.append(i)
                repeats_cut[r] = steps
            else:
                seen.add((owner[r], h))
        return cut

    # Uniform draws for DRAW_BLOCK steps of every row at a time (row r's draw at step t is
    # draws[t % DRAW_BLOCK, r]): one small torch.rand per block instead of one per step (on the CPU a
    # call costs more than its numbers), and a row's draws do not depend on when finished rows
    # leave the batch.
    sampling = temperature > 0
    for t in range(max_new_tokens):
        steps = t + 1
        if sampling and t % DRAW_BLOCK == 0:
            draws = torch.rand((min(DRAW_BLOCK, max_new_tokens - t), n), device=policy.device)
            if fused:
                draws_np = draws.numpy()
        if fused:
            u = draws_np[t % DRAW_BLOCK] if sampling else no_draws
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
                                         else torch.softmax(logits.float() / temperature, dim=-1),
                                         draws[t % DRAW_BLOCK][rows])
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
            alive[torch.from_numpy(at).to(policy.device)] = False
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
                alive_host = alive[:, 0].cpu().numpy()
                if storing:
                    save(np.flatnonzero(~alive_host))
                keep = cache.drop_rows(alive_host, first)
                first = first[keep]
                keep = torch.from_numpy(keep).to(policy.device)
                rows, tok, mask, pos, alive = rows[keep], tok[keep], mask[keep], pos[keep], alive[keep]
                head_hash, head_open = head_hash[keep], head_open[keep]
                if fused:  # the kept rows' tokens go back into the buffer the kernel writes
                    tok_buf[: len(rows)] = tok
                    tok, *views = row_views()
        if t == max_new_tokens - 1:
            break
        logits = policy.model(input_ids=tok, attention_mask=mask[..., : width + t + 1], position_ids=pos,
                            use_cache=True, **{cache_kw: cache}).logits[:, -1]
        pos = pos + 1
    flush()
    if storing:
        save(np.arange(len(rows)))
    if held and prefix_cache is not None and parked is not None and steps:
        at = torch.nonzero(alive[:, 0])[:, 0].cpu().numpy()
        starts, shared, saved = [], [], saved or {}
        for r, f in zip(rows.cpu().numpy()[at].tolist(), first[at].tolist()):
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
    position = torch.arange(cap, device=policy.device)[None, :]

    def through_first(table, within, otherwise):
        """Per row: whether a token in ``table`` occurs where ``within``, and the length up to
        and including the first one (``otherwise`` where none does)."""
        hit = table[out_tok] & within
        found = hit.any(1)
        return found, torch.where(found, hit.byte().argmax(1) + 1, otherwise)  # argmax: the first True

    length = torch.full((n,), steps, dtype=torch.long, device=policy.device)
    if limits is not None:  # a row stopped at its own limit; what it sampled after, riding along, is ignored
        length = torch.clamp(torch.from_numpy(limits).to(policy.device), max=steps)
    ended = torch.zeros(n, dtype=torch.bool, device=policy.device)
    if ends is not None:
        ended, length = through_first(ends, position < length[:, None], length)
    if repeats_cut:  # rows stopped after a repeated head end there, unfinished
        cut_rows = torch.tensor(list(repeats_cut), dtype=torch.long, device=policy.device)
        length[cut_rows] = torch.tensor(list(repeats_cut.values()), dtype=torch.long, device=policy.device)
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
