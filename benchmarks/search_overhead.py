"""Where MCTS spends its time with a real model: inside the model's forward passes or around them.

Runs MCTS (the engine's default search settings) with the tiny default model on 64 arithmetic
tasks and reports, measured in the same run:

* the share of wall time spent outside the model's forward passes (tree kernels, environment
  steps, tokenisation, generation bookkeeping); target <= 5%; split into the time inside
  ``policy.generate`` around its forward passes and the time in the search itself;
* how the search's forward time splits: prompt passes, and decoding steps of at most 16 rows (the
  tail of each call, when few rows are still running) with their share of the rows decoded;
* generated tokens/s during search against plain batched sampling of the same number of tokens
  (``policy.generate`` with no stop, every row running to the token cap); target >= 0.7x. Plain
  sampling runs at two batch sizes: the rows the search requests per ``generate`` call, and the
  rows it actually decodes per step (generated tokens / decoding steps; rows finish at different
  times, so most steps of a call run fewer rows than it started with); and, as sampling runs
  outside search, plain batched sampling of whole solutions at the requested batch, each row
  ending at its end-of-sequence token (so that its rows finish at different times too), by the
  policy and by transformers' own ``model.generate``;
* the share of its wall time each plain reference spends outside its forward passes, measured as
  the search's is: what batched sampling itself costs around the model, search or not;
* what bounds that ratio: the search's token steps (each ``generate`` call's longest row, summed)
  against its slowest tree's own calls, which run one after another (a tree's next selection
  needs the values of its last expansion), so that no batching across trees can take fewer (with
  ``--park-rows``, a rollout can span calls and this is no longer a bound); and
  the ratios the search's forward passes alone give (its tokens over its forward time), i.e. with
  nothing outside them.

``--widen HIDDEN,LAYERS,MLP`` runs everything with a larger copy of the model that computes the same
function (:func:`engine.tiny_model.widen_model`: zero-padded weights, so the same samples and trees at
the cost of a forward pass of that shape), which shows how the share outside the forward passes
falls as the forward pass grows to a realistic size; the script checks that the seeded search
builds the same trees with both models.

Forward time is measured with forward hooks on the model (synchronised on GPU). The same seeded
search and the plain sampling take turns ``--repeats`` times (3), so that both see the machine in
the same states, and each one's best (shortest) run is reported. Run from the repository root (the
default model is built on first use, about 3 minutes):

    .venv/bin/python benchmarks/search_overhead.py [--tasks 64] [--model DIR] [--repeats 3] [--device cpu]
        [--widen 512,6,1408]

The last line of output is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.config import TrainConfig  # noqa: E402
from engine.policy import TransformersPolicy  # noqa: E402
from engine.run_inputs import load_policy  # noqa: E402
from engine.search_runner import run_search  # noqa: E402
from engine.tiny_model import BootstrapConfig, bootstrap, widen_model  # noqa: E402
from envs import MathEnv, arithmetic_tasks  # noqa: E402


class ForwardTimer:
    """Accumulates wall time spent inside ``model.forward`` (outermost calls only), and how it
    splits: prompt passes (the first forward pass of each batch), and decoding steps of at most
    ``SMALL_STEP`` rows with the rows they ran."""

    SMALL_STEP = 16

    def __init__(self, model):
        self._start = 0.0
        self._kind = ""
        self._cuda = next(model.parameters()).is_cuda
        self.reset()
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post)

    def reset(self):
        self.total = self.prompt_time = self.small_time = 0.0
        self.calls = self.decode_steps = self.step_rows = self.small_rows = 0

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        self._kind = "prompt"
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        # a decoding step: its cache has seen a forward pass (a prompt pass continuing a context from
        # the prefix cache runs one position per row too); in transformers' own cache, one position a row
        layer = cache.layers[0] if cache is not None and cache.layers else None
        if ids is not None and layer is not None and not getattr(layer, "prompt_pass", ids.shape[1] > 1):
            self.decode_steps += 1
            self.step_rows += ids.shape[0]
            if ids.shape[0] <= self.SMALL_STEP:
                self.small_rows += ids.shape[0]
                self._kind = "small"
            else:
                self._kind = "step"
        if self._cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        if self._cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - self._start
        self.total += took
        self.calls += 1
        if self._kind == "prompt":
            self.prompt_time += took
        elif self._kind == "small":
            self.small_time += took

    def split(self) -> dict:
        """Shares of the forward time: prompt passes, and small decoding steps with their share of
        the rows decoded."""
        total = max(self.total, 1e-12)
        return {"prompt_passes": self.prompt_time / total, "small_steps": self.small_time / total,
                "small_steps_rows": self.small_rows / max(self.step_rows, 1)}


class CountingPolicy:
    """Forwards to a policy and counts generated tokens, rows, calls and the time inside them, and
    keeps each call's contexts and samples for :meth:`token_steps` (a context belongs to the task
    whose prompt it starts with)."""

    def __init__(self, policy, task_prompts):
        self.policy = policy
        self._tree_of = {p: b for b, p in enumerate(task_prompts)}
        self._prompt_lengths = sorted({len(p) for p in task_prompts}, reverse=True)
        self.reset()

    def reset(self):
        self.tokens = self.rows = self.calls = 0
        self.seconds = 0.0
        self.cache = None
        self.log: list[tuple[list, list]] = []  # per call, its contexts and samples (read after the search)

    def _tree(self, context: str) -> int:
        for k in self._prompt_lengths:  # the longest task prompt it starts with
            b = self._tree_of.get(context[:k])
            if b is not None:
                return b
        return -1

    def generate(self, prompts, **kw):
        t0 = time.perf_counter()
        out = self.policy.generate(prompts, **kw)
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(s.num_tokens for group in out for s in group)
        self.rows += sum(len(group) for group in out)
        self.calls += 1
        self.log.append((prompts, out))
        return out

    def token_steps(self) -> tuple[int, int]:
        """Token steps of the calls so far (each call's longest row, summed), and of the slowest
        tree's own calls: the decoding steps it needs one after another (a tree's simulations are
        sequential), so that no batching across trees takes fewer."""
        total, chains = 0, {}
        for prompts, out in self.log:
            longest: dict[int, int] = {}
            for context, group in zip(prompts, out):
                b = self._tree(context)
                longest[b] = max([longest.get(b, 0)] + [s.num_tokens for s in group])
            total += max(longest.values(), default=0)
            for b, k in longest.items():
                chains[b] = chains.get(b, 0) + k
        return total, max(chains.values(), default=0)

    def requested_batch(self) -> float:
        """Rows per ``generate`` call."""
        return self.rows / max(self.calls, 1)

    def logprobs(self, *a, **kw):
        return self.policy.logprobs(*a, **kw)

    def prefix_cache(self, *a, **kw):
        """The search's prefix cache (kept for its statistics)."""
        self.cache = self.policy.prefix_cache(*a, **kw)
        return self.cache


def fingerprint(tree) -> list:
    """Each tree's node texts, parents and visit counts (what two searches must agree on to have
    built the same trees)."""
    return [(tree.texts[b][:k], tree.parent[b, :k].tolist(), tree.visits[b, :k].tolist())
            for b, k in enumerate(tree.node_count.tolist())]


def widen_arg(text: str) -> tuple[int, int, int]:
    """``--widen``'s ``HIDDEN,LAYERS,MLP``."""
    try:
        hidden, layers, mlp = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give three integers HIDDEN,LAYERS,MLP, e.g. 512,6,1408") from None
    return hidden, layers, mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded default)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    ap.add_argument("--device", default="cpu", help="device of the model (cpu, cuda, ...)")
    ap.add_argument("--prefix-cache-mb", type=int, default=TrainConfig.prefix_cache_mb,
                    help="the search's prefix cache (0: none, every expansion runs a prompt pass over its context)")
    ap.add_argument("--park-rows", type=int, default=TrainConfig.park_rows,
                    help="rows of an expansion call left running into the next round's call (0: each round waits "
                         "for its slowest rollout)")
    ap.add_argument("--widen", type=widen_arg, default=None, metavar="HIDDEN,LAYERS,MLP",
                    help="run with a larger copy of the model computing the same function (hidden size, layers, "
                         "MLP width; e.g. 512,6,1408: 19M parameters from the default's 0.57M)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of the search and of plain sampling; each one's best (shortest) run is reported")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(bootstrap(BootstrapConfig(), log=print))
    policy = load_policy(model_dir, args.device)
    cfg = dataclasses.replace(TrainConfig(), tasks_per_iteration=args.tasks, prefix_cache_mb=args.prefix_cache_mb,
                              park_rows=args.park_rows)
    tasks = list(islice(arithmetic_tasks(12345), args.tasks))
    env = MathEnv(max_steps=cfg.max_depth)
    same_trees = None
    if args.widen:
        try:
            wide = widen_model(policy.model, hidden_size=args.widen[0], num_layers=args.widen[1],
                               intermediate_size=args.widen[2])
        except ValueError as exc:
            ap.error(f"--widen: {exc}")
        torch.manual_seed(0)
        reference = fingerprint(run_search(policy, env, tasks, cfg))  # the seeded search with the model itself
        policy = TransformersPolicy(wide, policy.tokenizer, device=args.device, batch_size=policy.batch_size)
    parameters = sum(p.numel() for p in policy.model.parameters())
    print(f"model: {parameters / 1e6:.2f}M parameters" + (" (widened, same function)" if args.widen else ""))

    # Warm-up: one whole search, which compiles the numba kernels and grows the policy's KV-cache arena
    # to the size the timed searches use (kept from one call to the next, as from one search to the
    # next in a training run). A shorter one left later rounds' longer contexts to grow it, ~0.1 s of
    # first-touch page faults inside the first timed search (a 15-16% outside share when that run was
    # the best of three, against ~11% otherwise).
    run_search(policy, env, tasks, cfg)

    timer = ForwardTimer(policy.model)
    counting = CountingPolicy(policy, [t["prompt"] for t in tasks])

    def time_search():
        """The same seeded search each time (identical work): wall, forward time, tokens, requested
        rows per batch, forward passes, nodes, decoded rows per decoding step, forward split, cache
        statistics, time inside ``generate``, (token steps, the slowest tree's chain of them)."""
        timer.reset()
        counting.reset()
        torch.manual_seed(0)
        t0 = time.perf_counter()
        tree = run_search(counting, env, tasks, cfg)
        wall = time.perf_counter() - t0
        if args.widen:
            nonlocal same_trees
            same_trees = same_trees is not False and fingerprint(tree) == reference  # every timed search
        return (wall, timer.total, counting.tokens, counting.requested_batch(), timer.calls,
                int(tree.node_count.sum()), counting.tokens / max(timer.decode_steps, 1), timer.split(),
                counting.cache.stats() if counting.cache is not None else None, counting.seconds,
                counting.token_steps())

    def sample_until(tokens: int, sample_batch):
        """Seconds, tokens and seconds inside forward passes of calls of ``sample_batch`` (one
        batch each, returning the tokens it sampled) until at least ``tokens`` tokens are sampled."""
        done = 0
        timer.reset()
        t0 = time.perf_counter()
        while done < tokens:
            done += sample_batch()
        return time.perf_counter() - t0, done, timer.total

    def generate(prompts: list[str], max_new_tokens: int) -> int:
        """One ``policy.generate`` batch; the tokens it sampled."""
        out = policy.generate(prompts, temperature=cfg.temperature, max_new_tokens=max_new_tokens, stop=None)
        return sum(s.num_tokens for g in out for s in g)

    def time_plain(tokens: int, batch: int):
        """Plain batched sampling of at least ``tokens`` tokens, ``batch`` rows running to the cap."""
        prompts = [t["prompt"] for t in islice(arithmetic_tasks(999), batch)]
        cap = min(max(1, round(tokens / batch)), 64)  # calls of at most 64 tokens (the policy's positions cap)
        saved = policy.eos_id, policy.model.generation_config.eos_token_id
        policy.eos_id = policy.model.generation_config.eos_token_id = None  # every row runs to the cap
        try:
            return sample_until(tokens, lambda: generate(prompts, cap))
        finally:
            policy.eos_id, policy.model.generation_config.eos_token_id = saved

    def time_solutions(tokens: int, batch: int):
        """Plain batched sampling of whole solutions until at least ``tokens`` tokens: calls of
        ``batch`` task prompts (new ones each call), each row ending at its end-of-sequence token
        or at the search's token cap, as sampling outside search does."""
        stream = arithmetic_tasks(999)
        return sample_until(tokens, lambda: generate([t["prompt"] for t in islice(stream, batch)], cfg.max_new_tokens))

    def time_transformers(tokens: int, batch: int):
        """transformers' own ``model.generate`` sampling whole solutions as :func:`time_solutions` does
        (same prompts, temperature and token cap; rows end at the end-of-sequence token, which counts),
        as a user of the library would call it."""
        stream, eos = arithmetic_tasks(999), policy.eos_id

        def sample_batch() -> int:
            enc = policy.tokenizer([t["prompt"] for t in islice(stream, batch)], return_tensors="pt", padding=True,
                                   add_special_tokens=False)  # as the policy encodes
            with torch.inference_mode():
                out = policy.model.generate(**enc.to(policy.device), do_sample=True, temperature=cfg.temperature,
                                            top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                                            pad_token_id=policy.pad_id)
            new = out[:, enc["input_ids"].shape[1] :]
            ended = new == eos if eos is not None else torch.zeros_like(new, dtype=torch.bool)
            return int(torch.where(ended.any(1), ended.byte().argmax(1) + 1, new.shape[1]).sum())

        return sample_until(tokens, sample_batch)

    # Search and plain sampling take turns, so that both see the machine in the same states; each
    # one's best (shortest) run is reported. Plain sampling with every row running to the cap runs at
    # two batch sizes: the rows the search asked for per batch, and the rows it actually decoded per
    # step (rows finish at different times, so most steps run fewer rows than were asked for); whole
    # solutions, by the policy and by transformers' generate, at the first.
    best = None
    plain = {"requested": None, "decoded": None, "solutions": None, "transformers": None}
    for _ in range(args.repeats):
        run = time_search()
        best = run if best is None or run[0] < best[0] else best
        for key, sample, rows in (("requested", time_plain, run[3]), ("decoded", time_plain, run[6]),
                                  ("solutions", time_solutions, run[3]),
                                  ("transformers", time_transformers, run[3])):
            p = sample(run[2], max(1, min(policy.batch_size, round(rows))))
            plain[key] = p if plain[key] is None or p[0] < plain[key][0] else plain[key]
    wall, fwd, tokens, requested, calls, nodes, decoded, split, cache, in_generate, (token_steps, chain) = best
    search_tps = tokens / wall
    plain_tps = {k: p[1] / p[0] for k, p in plain.items()}
    ratio = {k: search_tps / tps for k, tps in plain_tps.items()}

    outside = 1.0 - fwd / wall
    print(f"MCTS on {args.tasks} tasks: {cfg.simulations} simulations, {nodes} nodes, "
          f"{calls} forward passes; best of {args.repeats} runs")
    print(f"wall {wall:.2f}s, inside forward passes {fwd:.2f}s: "
          f"outside share {outside:.1%} (target <= 5%)")
    # every forward pass of this search (rollout values) runs inside generate
    outside_split = {"generation": (in_generate - fwd) / wall, "search": (wall - in_generate) / wall}
    print(f"  of which inside generate, around its forward passes (sampling, KV-cache row moves, prefix-cache "
          f"copies, tokenising): {in_generate - fwd:.2f}s ({outside_split['generation']:.1%}); in the search "
          f"itself (tree kernels, environment steps, contexts, values): {wall - in_generate:.2f}s "
          f"({outside_split['search']:.1%})")
    for key, rows in (("requested", requested), ("decoded", decoded)):
        print(f"tokens/s during search {search_tps:,.0f} vs plain batched sampling {plain_tps[key]:,.0f} "
              f"at the {key} batch ({rows:.0f} rows): {ratio[key]:.2f}x (target >= 0.7x)")
    print(f"  and vs plain batched sampling of whole solutions at the requested batch, rows ending at their end "
          f"token (as outside search): {plain_tps['solutions']:,.0f} tokens/s, "
          f"{ratio['solutions']:.2f}x (target >= 0.7x)")
    print(f"  and vs transformers' own generate sampling the same whole solutions: {plain_tps['transformers']:,.0f} "
          f"tokens/s, {ratio['transformers']:.2f}x (our plain sampling of them: "
          f"{plain_tps['solutions'] / plain_tps['transformers']:.2f}x transformers')")
    plain_outside = {k: 1.0 - p[2] / p[0] for k, p in plain.items()}
    print(f"outside the forward passes, plain batched sampling spends {plain_outside['requested']:.1%} (rows to the "
          f"cap, requested batch), {plain_outside['decoded']:.1%} (decoded batch), {plain_outside['solutions']:.1%} "
          f"(whole solutions); transformers' generate {plain_outside['transformers']:.1%} (whole solutions)")
    print(f"of the search's forward time: prompt passes {split['prompt_passes']:.0%}, decoding steps of at most "
          f"{ForwardTimer.SMALL_STEP} rows {split['small_steps']:.0%} (for {split['small_steps_rows']:.1%} of the "
          f"rows decoded)")
    print(f"token steps (each call's longest row, summed): {token_steps}; the slowest tree's own calls alone: {chain} "
          f"({chain / max(token_steps, 1):.0%}), the fewest any batching across trees can take (a tree's simulations "
          f"are sequential)")
    forward_only = {k: r / max(1.0 - outside, 1e-12) for k, r in ratio.items()}
    print(f"the search's forward passes alone (its tokens over its forward time) against plain sampling: "
          f"{forward_only['requested']:.2f}x at the requested batch, {forward_only['decoded']:.2f}x at the decoded one")
    if args.widen:
        print(f"the widened model's search built {'the same' if same_trees else 'DIFFERENT'} trees as the model's own "
              "(texts, parents, visits)")
    if cache is None:
        print("prefix cache: none (--prefix-cache-mb 0)")
    else:
        print(f"prefix cache: {cache['hits']} of {cache['hits'] + cache['misses']} contexts found "
              f"({cache['entries']} stored, {cache['bytes'] / 2**20:.1f} MiB)")
    print(json.dumps({"tasks": args.tasks, "model_parameters": parameters, "widen": args.widen,
                      "same_trees_as_unwidened": same_trees, "wall_s": wall, "forward_s": fwd, "prefix_cache": cache,
                      "outside_forward_share": outside, "outside_forward_split": outside_split,
                      "search_tokens_per_s": search_tps,
                      "plain_tokens_per_s": plain_tps,
                      "requested_batch": requested, "decoded_batch": decoded,
                      "ratio_vs_plain": ratio, "plain_outside_forward_share": plain_outside, "forward_split": split,
                      "token_steps": token_steps, "slowest_tree_token_steps": chain, "ratio_forward_only": forward_only,
                      "targets_met": {"outside_share": outside <= 0.05,
                                      "tokens_ratio_at_requested_batch": ratio["requested"] >= 0.7,
                                      "tokens_ratio_at_decoded_batch": ratio["decoded"] >= 0.7,
                                      "tokens_ratio_vs_whole_solutions": ratio["solutions"] >= 0.7}}))


if __name__ == "__main__":
    main()
