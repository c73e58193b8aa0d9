"""Decoding-step attention (engine.attention) against transformers' sdpa: same values, same samples."""

import contextlib
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import engine.attention
import engine.policy
from engine import TransformersPolicy
from engine.attention import ATTENTION, decoding_attention, decoding_attention_for


class _Heads(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_a_step_attends_as_sdpa_does(groups, mask):
    gen = torch.Generator().manual_seed(groups)
    rows, kv_heads, positions, dim = 9, 2, 13, 8
    q = torch.randn(rows, kv_heads * groups, 1, dim, generator=gen)
    buffer = torch.randn(2, rows, kv_heads, 20, dim, generator=gen)
    k, v = buffer[0, :, :, :positions], buffer[1, :, :, :positions]  # views of a larger buffer, as the cache's
    keep = torch.rand(rows, 1, 1, positions, generator=gen) > 0.3
    keep[..., -1] = True  # every row attends to its own last position
    given = {"none": None, "bool": keep,
             "additive": torch.zeros(keep.shape).masked_fill_(~keep, torch.finfo(torch.float32).min)}[mask]
    module = _Heads(groups)
    got, _ = decoding_attention(module, q, k, v, given, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, keep if mask != "none" else None, scaling=0.3)
    assert got.shape == want.shape == (rows, 1, kv_heads * groups, dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_anything_but_a_step_goes_to_sdpa():
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 4, 8, generator=gen)  # five queries per row: a prompt pass
    module = _Heads(1)
    got, _ = decoding_attention(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="softcap"):  # handed over with its arguments
        decoding_attention(module, q[:, :, :1], k, v, None, softcap=30.0)
    half = [x[:, :, :1].bfloat16() if x is q else x.bfloat16() for x in (q, k, v)]
    assert torch.equal(decoding_attention(module, *half, None)[0], sdpa_attention_forward(module, *half, None)[0])


def _samples(policy, prompts, **kw):
    torch.manual_seed(5)
    return [s for group in policy.generate(prompts, **kw) for s in group]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_generation_is_the_same_as_with_sdpa(trained_model_dir, monkeypatch, tmp_path, kv_heads):
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    if kv_heads == 4:
        model = AutoModelForCausalLM.from_pretrained(trained_model_dir)
    else:  # grouped key/value heads: a random model of the same vocabulary
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                             bos_token_id=None))
        model.set_attn_implementation("sdpa")
    policy = TransformersPolicy(model, tok, batch_size=32)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n", "7*8\n"] * 2  # different lengths: padded rows
    kw = dict(num_samples=3, temperature=0.8, max_new_tokens=24, stop=None)
    seen = []
    real = engine.policy.decoding_attention_for

    def spy(m):
        seen.append(m.config._attn_implementation)
        return real(m)

    monkeypatch.setattr(engine.policy, "decoding_attention_for", spy)
    handed = []  # calls that went to sdpa: prompt passes only
    monkeypatch.setattr(engine.attention, "sdpa_attention_forward",
                        lambda *a, **k: handed.append(a[1].shape[2]) or sdpa_attention_forward(*a, **k))
    passes = []
    hook = model.register_forward_pre_hook(lambda m, a, k: passes.append(k["input_ids"].shape[1]), with_kwargs=True)
    ours = _samples(policy, prompts, **kw)
    hook.remove()
    layers = model.config.num_hidden_layers
    assert handed == [n for n in passes for _ in range(layers) if n > 1]
    assert len(passes) * layers > 10 * len(handed) > 0
    cache = policy.prefix_cache()
    ours_cached = [_samples(policy, prompts, prefix_cache=cache, head_stop="\n", **kw) for _ in range(2)]
    monkeypatch.setattr(engine.policy, "decoding_attention_for", lambda m: contextlib.nullcontext())
    theirs = _samples(policy, prompts, **kw)
    cache = policy.prefix_cache()
    theirs_cached = [_samples(policy, prompts, prefix_cache=cache, head_stop="\n", **kw) for _ in range(2)]
    assert seen and set(seen) == {"sdpa"}
    for a, b in zip([ours, *ours_cached], [theirs, *theirs_cached]):
        assert [s.text for s in a] == [s.text for s in b]
        np.testing.assert_allclose([s.logprob for s in a], [s.logprob for s in b], atol=1e-4)
    # the switch lasts for the call only, and is not saved with the model
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert ATTENTION not in json.dumps(json.load(open(tmp_path / "config.json")))


def test_the_switch_is_undone_on_error_and_skips_other_implementations(tiny_random):
    model, _ = tiny_random
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError), decoding_attention_for(model):
        assert model.config._attn_implementation == ATTENTION
        raise RuntimeError
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with decoding_attention_for(model):
        assert model.config._attn_implementation == "eager"
