"""The embedded default: a tiny Llama-style model trained from scratch on generated arithmetic.

``bootstrap(config)`` builds a character-level tokenizer and a ~0.5M-parameter causal LM, trains
it with supervised fine-tuning on procedurally generated problems (prompt tokens masked, one
difficulty level per batch, AdamW with warmup and cosine decay) and stops as soon as a quick
greedy evaluation reaches ``target_accuracy``: early enough that search and preference learning
still have room to improve it. Everything is seeded, so the same config gives the same weights;
the result is saved in the ordinary transformers format and cached under a key derived from the
config, so a second call returns at once.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from envs import ARITHMETIC_LEVELS, arithmetic_tasks, heldout_arithmetic_tasks

__all__ = ["BootstrapConfig", "CHARS", "TinyModelConfig", "bootstrap", "build_cached", "build_model", "build_tokenizer",
           "default_cache_dir", "sft_batch", "warmup_cosine_lr", "widen_model"]

CHARS = "0123456789+-*=()# \n"
"""Every character of the arithmetic tasks; the vocabulary is these plus pad, eos and unk."""
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
FORMAT_VERSION = 1
"""Bumped whenever a change to this file changes the trained weights; part of the cache key."""


@dataclass(frozen=True)
class TinyModelConfig:
    """The shape and SFT optimiser settings shared by the embedded default models (math and code)."""

    seed: int = 0
    """Seed for initialisation, data and training order."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 3
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    intermediate_size: int = 320
    """Width of the MLP."""
    batch_size: int = 32
    """Training examples per SFT step (math: all of one difficulty level)."""
    lr: float = 2e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 100
    """Linear warmup steps before cosine decay."""


@dataclass(frozen=True)
class BootstrapConfig(TinyModelConfig):
    """How the embedded default model is built and trained."""

    max_steps: int = 2400
    """Upper bound on SFT steps (also the length of the cosine schedule)."""
    eval_every: int = 100
    """Steps between quick evaluations."""
    target_accuracy: float = 0.5
    """Stop as soon as the quick evaluation reaches this greedy accuracy."""
    quick_eval_size: int = 200
    """Problems in the quick evaluation (distinct from the held-out set)."""
    levels: tuple[int, ...] = ARITHMETIC_LEVELS
    """Difficulty levels (number of operations) trained on."""


def default_cache_dir() -> Path:
    """``$ENGINE_CACHE`` if set, else ``~/.cache/engine``."""
    return Path(os.environ.get("ENGINE_CACHE") or Path.home() / ".cache" / "engine")


def cache_key(config: BootstrapConfig) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, **dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tokenizer(chars: str = CHARS):
    """A character-level ``PreTrainedTokenizerFast`` over ``chars`` that ``AutoTokenizer`` can reload."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def build_model(config: BootstrapConfig, vocab_size: int, pad_id: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def widen_model(model, *, hidden_size: int, num_layers: int, intermediate_size: int):
    """A larger Llama that computes the same function as ``model`` (a ``LlamaForCausalLM``): the
    same logits up to rounding, so the same samples and search trees, at the cost of a forward
    pass of the larger shape. It is how the cost of everything around the forward passes is
    measured against a forward pass of realistic size without downloading weights
    (``benchmarks/search_overhead.py --widen``).

    Every weight is copied into the leading block of its larger counterpart and the rest is zero:
    the added residual dimensions stay zero, the added attention heads (same head size) have zero
    queries, keys, values and outputs, the added MLP units zero weights, and the added layers
    (after the original ones) zero projections, so each adds nothing to the residual stream. The
    RMSNorm weights and epsilon are rescaled by ``model.hidden_size / hidden_size``, as the mean
    of squares over the wider residual is the original one times that ratio."""
    from transformers import LlamaForCausalLM

    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"widen_model takes a LlamaForCausalLM, got a {type(model).__name__}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads  # query heads per key/value head
    old = (config.hidden_size, config.num_hidden_layers, config.intermediate_size)
    new = (hidden_size, num_layers, intermediate_size)
    if any(n < o for n, o in zip(new, old)) or hidden_size % (head_dim * group):
        raise ValueError(f"widen_model: hidden size, layers and MLP width {new} must each be at least the model's "
                         f"{old}, and the hidden size a multiple of {head_dim * group} (head size {head_dim} times "
                         f"{group} query heads per key/value head)")
    ratio = config.hidden_size / hidden_size
    heads = hidden_size // head_dim
    wide = LlamaForCausalLM(type(config)(**{
        **config.to_dict(), "hidden_size": hidden_size, "num_hidden_layers": num_layers,
        "intermediate_size": intermediate_size, "num_attention_heads": heads, "num_key_value_heads": heads // group,
        "head_dim": head_dim, "rms_norm_eps": config.rms_norm_eps * ratio})).to(model.dtype)
    weights = model.state_dict()
    with torch.no_grad():
        for name, p in wide.named_parameters():  # (a tied output layer is the embedding's parameter)
            w = weights.get(name)
            norm = name.endswith("norm.weight")  # RMSNorm
            p.fill_(1.0 if norm and w is None else 0.0)  # an added layer's norms are ones, its projections zero
            if w is not None:
                p[tuple(slice(0, k) for k in w.shape)] = w * math.sqrt(ratio) if norm else w
    wide.generation_config = copy.deepcopy(model.generation_config)  # its own: changing one leaves the other
    return wide.to(next(model.parameters()).device).eval()


def warmup_cosine_lr(config, step: int) -> float:
    """Linear warmup over ``config.warmup_steps``, then cosine decay to 0 at ``config.max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    frac = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def sft_batch(examples: list[tuple[str, str]], char_ids: dict[str, int], eos_id: int, pad_id: int):
    """``(input_ids, attention_mask, labels)`` for ``(prompt, target)`` texts: right-padded, the
    target followed by EOS, labels -100 on the prompt and the padding."""
    seqs, labels = [], []
    for prompt, target in examples:
        p = [char_ids[c] for c in prompt]
        s = [char_ids[c] for c in target] + [eos_id]
        seqs.append(p + s)
        labels.append([-100] * len(p) + s)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s, lb) in enumerate(zip(seqs, labels)):
        ids[r, : len(s)] = torch.tensor(s)
        lab[r, : len(s)] = torch.tensor(lb)
        mask[r, : len(s)] = 1
    return ids, mask, lab


def train_tiny_model(
    config: BootstrapConfig, out_dir: Path, log: Callable[[str], None] = print
) -> dict:
    """Train from scratch and save model + tokenizer to ``out_dir``; returns a summary dict."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from engine.evaluate import evaluate
    from engine.policy import TransformersPolicy

    t0 = time.time()
    torch.manual_seed(config.seed)
    tok = build_tokenizer()
    model = build_model(config, len(tok), tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(config.seed)
    model.apply(model._init_weights)
    n_params = sum(p.numel() for p in model.parameters())
    char_ids = {c: tok.convert_tokens_to_ids(c) for c in CHARS}

    heldout = {t["prompt"] for t in heldout_arithmetic_tasks(500, config.levels)}
    quick_stream = arithmetic_tasks(config.seed + 7_000_001, config.levels, exclude=heldout)
    quick = [next(quick_stream) for _ in range(config.quick_eval_size)]
    exclude = heldout | {t["prompt"] for t in quick}
    streams = {lv: arithmetic_tasks(config.seed * 1000 + lv, (lv,), exclude=exclude) for lv in config.levels}
    policy = TransformersPolicy(model, tok, batch_size=256)

    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1)

    acc, step, tokens, history = 0.0, 0, 0, []
    with Progress(TextColumn("[bold]bootstrap SFT"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), transient=False) as bar:
        task_id = bar.add_task("sft", total=config.max_steps, info="")
        for step in range(1, config.max_steps + 1):
            model.train()
            level = config.levels[(step - 1) % len(config.levels)]
            batch = [next(streams[level]) for _ in range(config.batch_size)]
            ids, mask, lab = sft_batch([(t["prompt"], t["solution"]) for t in batch], char_ids, tok.eos_token_id,
                                       tok.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = warmup_cosine_lr(config, step - 1)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tokens += int(mask.sum())
            loss_v = loss.item()
            if step % config.eval_every == 0:
                acc = evaluate(policy, quick, max_new_tokens=96)["heldout_accuracy"]
                history.append({"step": step, "loss": loss_v, "quick_accuracy": acc})
                bar.console.print(f"  step {step}: loss {loss_v:.3f}, quick greedy accuracy {acc:.1%} "
                                  f"({time.time() - t0:.0f}s)")
            bar.update(task_id, completed=step, info=f"loss {loss_v:.3f}  quick acc {acc:.0%}")
            if step % config.eval_every == 0 and acc >= config.target_accuracy:
                break
    wall = time.time() - t0
    summary = {
        "steps": step,
        "quick_accuracy": acc,
        "parameters": n_params,
        "train_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "config": dataclasses.asdict(config),
        "history": history,
    }
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "bootstrap.json").write_text(json.dumps(summary, indent=2))
    log(f"trained {n_params / 1e6:.2f}M parameters for {step} steps in {wall:.0f}s; "
        f"quick greedy accuracy {acc:.1%}")
    return summary


def build_cached(target: Path, train: Callable[[Path], object], *, what: str,
                 log: Callable[[str], None] = print) -> Path:
    """``target`` when it holds a finished model (``bootstrap.json``); otherwise ``train(tmp)`` into a
    temporary sibling directory, renamed into place (another process finishing first wins)."""
    if (target / "bootstrap.json").is_file():
        log(f"{what}: cached at {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    log(f"{what}: not cached; training it into {target}")
    try:
        train(tmp)
        if target.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{what}: saved at {target}")
    return target


def bootstrap(
    config: BootstrapConfig = BootstrapConfig(),
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """The directory of the trained default model for ``config``, training it if not cached."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    return build_cached(cache_dir / f"tiny-{cache_key(config)}", lambda out: train_tiny_model(config, out, log),
                        what="default model", log=log)
