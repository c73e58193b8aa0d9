from itertools import islice

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.policy import TransformersPolicy
from engine.sampling import sample_inverse_cdf as _sample
from engine.tiny_model import BootstrapConfig, bootstrap
from envs import arithmetic_tasks


def test_saved_model_loads_with_auto_classes(trained_model_dir):
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir)
    ids = tok("(12+5)*3\n17*3=51\n#### 51\n", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "(12+5)*3\n17*3=51\n#### 51\n"
    assert tok.unk_token_id not in ids
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 3_000_000 or model.config.hidden_size == 64
    assert (trained_model_dir / "bootstrap.json").is_file()


def test_bootstrap_is_deterministic_and_cached(tmp_path, quick_bootstrap):
    cfg = BootstrapConfig(**{**quick_bootstrap, "max_steps": 20, "eval_every": 20, "quick_eval_size": 4})
    logs = []
    a = bootstrap(cfg, cache_dir=tmp_path / "a", log=logs.append)
    b = bootstrap(cfg, cache_dir=tmp_path / "b", log=logs.append)
    again = bootstrap(cfg, cache_dir=tmp_path / "a", log=logs.append)
    assert again == a and any("cached at" in line for line in logs)
    sa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    other = bootstrap(BootstrapConfig(**{**quick_bootstrap, "max_steps": 20, "eval_every": 20,
                                         "quick_eval_size": 4, "seed": 1}), cache_dir=tmp_path / "a",
                      log=logs.append)
    so = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert other != a and not all(torch.equal(sa[k], so[k]) for k in sa)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # the decoding steps' 4-D masks take each one's form
def test_generate_logprobs_equal_scoring(trained_model_dir, attention, device):
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir, attn_implementation=attention).to(device)
    assert model.config._attn_implementation == attention
    policy = TransformersPolicy(model, tok, device=device)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n"]
    torch.manual_seed(0)
    samples = policy.generate(prompts, num_samples=3, temperature=1.0, max_new_tokens=12, stop="\n")
    flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
    assert len(flat) == 6
    for _, s in flat:  # cut just after the stop; a finished sample without it ended on end-of-sequence
        assert "\n" not in s.text[:-1] and (s.text.endswith("\n") or s.finished or s.num_tokens == 12)
    scored = policy.logprobs([p for p, _ in flat], [s.text for _, s in flat])
    finished = [i for i, (_, s) in enumerate(flat) if s.finished and s.text.endswith("\n")]
    np.testing.assert_allclose(scored[finished], [flat[i][1].logprob for i in finished], rtol=1e-4, atol=1e-4)
    greedy1 = policy.generate(prompts, temperature=0.0, max_new_tokens=40, stop=None)
    greedy2 = policy.generate(prompts[::-1], temperature=0.0, max_new_tokens=40, stop=None)
    assert [g[0].text for g in greedy1] == [g[0].text for g in greedy2[::-1]]  # batching does not change greedy


def _random_model(kind: str, vocab_size: int):
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    small = dict(vocab_size=vocab_size, hidden_size=32, num_attention_heads=4)
    if kind == "qwen2-sliding-window":  # the window (4) is shorter than prompt + continuation
        return Qwen2ForCausalLM(Qwen2Config(**small, intermediate_size=64, num_hidden_layers=2, num_key_value_heads=2,
                                            use_sliding_window=True, sliding_window=4, max_window_layers=0))
    if kind == "bloom-alibi":  # builds its position bias from the 2-D mask
        return BloomForCausalLM(BloomConfig(vocab_size=vocab_size, hidden_size=32, n_head=4, n_layer=2))
    return LlamaForCausalLM(LlamaConfig(**small, intermediate_size=64, num_hidden_layers=2)).to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["qwen2-sliding-window", "bloom-alibi", "llama-bf16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_generate_logprobs_equal_scoring_on_other_architectures(trained_model_dir, kind, attention, device):
    """Decoding with the KV cache (rows of different lengths leaving the batch) scores its samples
    as a full forward pass does, for a sliding window, an ALiBi bias and a bf16 cache on the CPU."""
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = _random_model(kind, len(tok)).to(device).eval()
    model.set_attn_implementation(attention)
    policy = TransformersPolicy(model, tok, device=device)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n", "7\n"]
    torch.manual_seed(1)
    samples = policy.generate(prompts, num_samples=4, temperature=1.0, max_new_tokens=14, stop="1")
    flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
    lengths = {s.num_tokens for _, s in flat}
    assert len(lengths) > 2  # rows finished at different steps, so rows left the batch
    kept = [(p, s) for p, s in flat if s.text.endswith("1") or not s.finished]  # not those ended by EOS
    assert len(kept) >= 6
    scored = policy.logprobs([p for p, _ in kept], [s.text for _, s in kept])
    tolerance = 0.05 * max(lengths) if kind == "llama-bf16" else 1e-3
    np.testing.assert_allclose(scored, [s.logprob for _, s in kept], atol=tolerance)


def test_generate_shares_prompts_across_samples_and_batches(trained_model_dir, device):
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir).to(device)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n", "7*8\n"]
    wide = TransformersPolicy(model, tok, device=device)
    narrow = TransformersPolicy(model, tok, device=device, batch_size=2)  # one prompt (two rows) per batch
    shared = wide.generate(prompts, num_samples=2, temperature=0.0, max_new_tokens=30, stop=None)
    apart = narrow.generate([p for p in prompts for _ in range(2)], temperature=0.0, max_new_tokens=30, stop=None)
    assert [[s.text for s in g] for g in shared] == [[apart[2 * i][0].text, apart[2 * i + 1][0].text]
                                                     for i in range(len(prompts))]
    np.testing.assert_allclose([s.logprob for g in shared for s in g], [g[0].logprob for g in apart], atol=1e-4)
    torch.manual_seed(0)
    sampled = wide.generate(prompts[:1], num_samples=6, temperature=1.0, max_new_tokens=20, stop=None)[0]
    assert len({s.text for s in sampled}) > 1  # the copied cache rows are sampled independently
    # a number of samples per prompt: the same rows as one call per prompt, in batches of at most 3 rows
    mixed = TransformersPolicy(model, tok, device=device, batch_size=3).generate(
        prompts, num_samples=[2, 1, 3], temperature=0.0, max_new_tokens=30, stop=None)
    assert [len(g) for g in mixed] == [2, 1, 3]
    alone = [wide.generate([p], num_samples=k, temperature=0.0, max_new_tokens=30, stop=None)[0]
             for p, k in zip(prompts, [2, 1, 3])]
    assert [[s.text for s in g] for g in mixed] == [[s.text for s in g] for g in alone]
    np.testing.assert_allclose([s.logprob for g in mixed for s in g], [s.logprob for g in alone for s in g],
                               atol=1e-4)
    with pytest.raises(ValueError, match="one per prompt"):
        wide.generate(prompts, num_samples=[1, 2])
    with pytest.raises(ValueError, match=">= 1"):
        wide.generate(prompts, num_samples=[1, 0, 2])


def test_inverse_cdf_sampling_draws_each_token_at_its_probability():
    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0]])  # rows need not sum to 1
    draws = _sample(probs.repeat_interleave(20_000, 0))
    assert draws.shape == (40_000, 1)
    first = torch.bincount(draws[:20_000, 0], minlength=4) / 20_000
    np.testing.assert_allclose(first.numpy(), [0.1, 0.0, 0.6, 0.3], atol=0.015)
    assert first[1] == 0 and (draws[20_000:] == 3).all()  # probability 0 is never drawn


def test_head_stop_reports_the_first_line_as_scoring_does(trained_model_dir, device):
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir).to(device)
    policy = TransformersPolicy(model, tok, device=device)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n"]
    torch.manual_seed(1)
    samples = policy.generate(prompts, num_samples=8, temperature=1.0, max_new_tokens=40, stop=None, head_stop="\n")
    rows = [(p, s) for p, group in zip(prompts, samples) for s in group if "\n" in s.text]
    assert len(rows) >= 4 and any(s.text.count("\n") > 1 for _, s in rows)  # they ran on past the first line
    heads = [s.text[: s.text.index("\n") + 1] for _, s in rows]
    assert [s.head_tokens for _, s in rows] == [len(tok(h, add_special_tokens=False)["input_ids"]) for h in heads]
    assert all(s.head_tokens < s.num_tokens or s.text.count("\n") == 1 for _, s in rows)
    np.testing.assert_allclose([s.head_logprob for _, s in rows], policy.logprobs([p for p, _ in rows], heads),
                               rtol=1e-4, atol=1e-4)
    plain = policy.generate(prompts, temperature=0.0, max_new_tokens=20, stop="\n")  # without head_stop: all of it
    assert all(s.head_tokens == s.num_tokens and s.head_logprob == s.logprob for g in plain for s in g)


def test_fast_decode_equals_batch_decode(trained_model_dir):
    policy = TransformersPolicy(AutoModelForCausalLM.from_pretrained(trained_model_dir),
                                AutoTokenizer.from_pretrained(trained_model_dir))
    seqs = [list(np.random.default_rng(i).integers(0, len(policy.tokenizer), 30)) for i in range(8)] + [[]]
    seqs = [[int(t) for t in s] for s in seqs]
    assert policy._texts(seqs) == policy.tokenizer.batch_decode(seqs)
    texts = ["12+7=19\n#### 19\n", "", "(3*4)-5=7\n", "x\u00e9?"]
    assert policy._encode(texts) == [list(x) for x in policy.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def test_fast_encode_and_decode_equal_the_tokenizer_on_byte_level_bpe():
    """The policy's direct calls into the Rust backend give what the tokenizer's own calls give,
    on a byte-level BPE (merges across spaces, multi-byte characters split over tokens), and the
    backend is bypassed where the tokenizer would truncate."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Natalia sold 48 clips in April, and half as many in May.",
              "d\u00e9j\u00e0 vu \u2014 \u65e5\u672c\n"] * 20
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", clean_up_tokenization_spaces=False)
    policy = TransformersPolicy(None, tokenizer)
    texts = corpus[:2] + ["  two spaces\n\nand lines", "\u65e5", ""]
    ids = policy._encode(texts)
    assert ids == [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    assert max(len(x) for x in ids) > 1 and policy._backend() is not None
    assert policy._texts(ids) == tokenizer.batch_decode(ids) == texts
    split = [x[:1] for x in ids if x]  # a lone byte of a multi-byte character included
    assert policy._texts(split) == tokenizer.batch_decode(split)
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    assert policy._backend() is None


def test_rows_leaving_the_batch_do_not_change_the_others(trained_model_dir, device):
    """Greedy decoding of many prompts in one batch (rows finish at different steps and leave it,
    the cache's holes filled by later rows) equals decoding each prompt alone."""
    policy = TransformersPolicy(AutoModelForCausalLM.from_pretrained(trained_model_dir).to(device),
                                AutoTokenizer.from_pretrained(trained_model_dir), device=device)
    prompts = [t["prompt"] for _, t in zip(range(12), arithmetic_tasks(3))]
    # (the briefly trained test model writes few newlines: a digit as the stop ends rows at many steps)
    together = policy.generate(prompts, temperature=0.0, max_new_tokens=40, stop="1")
    alone = [policy.generate([p], temperature=0.0, max_new_tokens=40, stop="1")[0] for p in prompts]
    assert len({s.num_tokens for g in together for s in g}) > 3  # rows did finish at different steps
    assert [g[0].text for g in together] == [g[0].text for g in alone]
    np.testing.assert_allclose([g[0].logprob for g in together], [g[0].logprob for g in alone], atol=1e-4)


def test_unique_heads_stop_samples_that_repeat_a_first_line(trained_model_dir, device):
    policy = TransformersPolicy(AutoModelForCausalLM.from_pretrained(trained_model_dir).to(device),
                                AutoTokenizer.from_pretrained(trained_model_dir), device=device)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n"]
    # greedy: the 8 samples of a prompt share their first line, and only one of them runs on
    groups = policy.generate(prompts, num_samples=8, temperature=0.0, max_new_tokens=30, stop=None, head_stop="\n",
                             unique_heads=True)
    free = policy.generate(prompts, num_samples=8, temperature=0.0, max_new_tokens=30, stop=None, head_stop="\n")
    cut = 0
    for group in groups:
        heads = [s.text[: s.text.index("\n") + 1] for s in group if "\n" in s.text]
        ran_on = [h for s, h in zip([s for s in group if "\n" in s.text], heads) if not s.duplicate]
        assert len(ran_on) == len(set(ran_on))  # one sample runs on per first line
        for s in group:
            if s.duplicate:
                cut += 1
                assert s.text.count("\n") == 1 and s.text.endswith("\n") and not s.finished
                assert s.text in heads and s.num_tokens == s.head_tokens
    assert cut == 14
    for group, other in zip(groups, free):  # the one that ran on is what it would have been
        kept = [s for s in group if not s.duplicate]
        assert len(kept) == 1 and kept[0].text == other[0].text and not any(s.duplicate for s in other)


def test_a_token_cap_per_prompt_cuts_each_row_at_its_own(trained_model_dir, device):
    """``max_new_tokens`` per prompt: each row stops at its own cap (as a call with that cap alone
    would), and what a row sampled after it, riding along, counts for nothing."""
    policy = TransformersPolicy(AutoModelForCausalLM.from_pretrained(trained_model_dir).to(device),
                                AutoTokenizer.from_pretrained(trained_model_dir), device=device)
    prompts = [t["prompt"] for _, t in zip(range(10), arithmetic_tasks(9))]
    free = [g[0].num_tokens for g in policy.generate(prompts, temperature=0.0, max_new_tokens=40, stop="7")]
    caps = [max(1, n // 2) if i % 2 else n + 3 for i, n in enumerate(free)]  # half of them cut short
    capped = policy.generate(prompts, temperature=0.0, max_new_tokens=caps, stop="7")
    alone = [policy.generate([p], temperature=0.0, max_new_tokens=c, stop="7")[0] for p, c in zip(prompts, caps)]
    assert [g[0].text for g in capped] == [g[0].text for g in alone]
    assert [g[0].finished for g in capped] == [g[0].finished for g in alone]
    assert any(g[0].num_tokens == c and not g[0].finished for g, c in zip(capped, caps))  # some stopped at their cap
    np.testing.assert_allclose([g[0].logprob for g in capped], [g[0].logprob for g in alone], atol=1e-4)
    with pytest.raises(ValueError, match="one per prompt"):
        policy.generate(prompts, max_new_tokens=[4, 5])
    with pytest.raises(ValueError, match="whole number"):
        policy.generate(prompts, max_new_tokens=2.5)
    with pytest.raises(ValueError, match="whole number"):
        policy.generate(prompts, park=1.5)
    # a cap of 0 returns nothing, even for rows whose first draw (riding along) would repeat a head
    for seed in range(20):
        torch.manual_seed(seed)
        zero, other = policy.generate(["2+2\n", "3\n"], num_samples=[8, 1], max_new_tokens=[0, 5], stop=None,
                                      head_stop="1", unique_heads=True, temperature=3.0)
        assert all(s.num_tokens == 0 and s.text == "" and not s.duplicate for s in zero)
        assert 0 < other[0].num_tokens <= 5


@pytest.mark.parametrize("kv_heads, tied", [(None, True), (1, False)])  # grouped key/value heads, own output layer
def test_widened_model_computes_the_same_function(trained_model_dir, kv_heads, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.tiny_model import widen_model

    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir).eval()
    if kv_heads is not None:  # a randomly initialised model with 2 query heads per key/value head, untied
        config = LlamaConfig(**{**model.config.to_dict(), "num_key_value_heads": kv_heads,
                                "tie_word_embeddings": tied})
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    h, layers, mlp = model.config.hidden_size, model.config.num_hidden_layers, model.config.intermediate_size
    wide = widen_model(model, hidden_size=4 * h, num_layers=layers + 2, intermediate_size=3 * mlp)
    assert wide.config.num_attention_heads == 4 * model.config.num_attention_heads
    assert sum(p.numel() for p in wide.parameters()) > 20 * sum(p.numel() for p in model.parameters())
    ids = torch.tensor(tok(["(12+5)*3\n17*3=51\n", "4*(2+9)\n"], add_special_tokens=False, padding=True)["input_ids"])
    mask = (ids != tok.pad_token_id).long()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = wide(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(3), 4)]

    def greedy(m):
        out = TransformersPolicy(m, tok).generate(prompts, temperature=0.0, max_new_tokens=24, stop=None)
        return [[s.text for s in g] for g in out]

    assert greedy(model) == greedy(wide)
    with pytest.raises(ValueError, match="at least"):
        widen_model(model, hidden_size=h // 2, num_layers=layers, intermediate_size=mlp)
