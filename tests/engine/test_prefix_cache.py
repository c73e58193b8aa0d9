"""The prefix cache: contexts generated earlier continue from their stored keys and values, with
the samples a fresh prompt pass gives."""

import dataclasses
from itertools import islice

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM

import engine.kv_cache as kv_cache
import engine.prefix_cache as prefix_cache
from engine.config import TrainConfig, validate
from engine.policy import TransformersPolicy
from engine.search_runner import run_search
from envs import MathEnv, arithmetic_tasks

STOP = "1"  # the briefly trained test model writes few newlines; a digit ends heads at many steps


def _policy(model_dir, device) -> TransformersPolicy:
    return TransformersPolicy(AutoModelForCausalLM.from_pretrained(model_dir).to(device),
                              AutoTokenizer.from_pretrained(model_dir), device=device)


def _contexts(prompts, groups, stop=STOP) -> list[str]:
    """Each prompt extended by each of its samples' heads (through the first ``stop``)."""
    out = [p + s.text[: s.text.index(stop) + len(stop)] for p, g in zip(prompts, groups) for s in g if stop in s.text]
    return list(dict.fromkeys(out))


def _same(a, b, atol=1e-4):
    assert [[s.text for s in g] for g in a] == [[s.text for s in g] for g in b]
    np.testing.assert_allclose([s.logprob for g in a for s in g], [s.logprob for g in b for s in g], atol=atol)


def _check_entries(policy, cache):
    """Every entry's pooled keys and values are those a forward pass over its tokens computes, and
    each slot is held once per entry that lists it (no hold left over, none missing)."""
    for entry in cache._entries.values():
        past = DynamicCache(config=policy.model.config)
        with torch.no_grad():
            policy.model(input_ids=torch.tensor([entry.ids[:-1]], device=policy.device), use_cache=True,
                         **{policy._cache_kw(): past})
        for (pool_k, pool_v), layer in zip(cache.pools, past.layers):
            torch.testing.assert_close(pool_k[entry.tokens].transpose(0, 1), layer.keys[0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(pool_v[entry.tokens].transpose(0, 1), layer.values[0], atol=1e-4, rtol=1e-4)
    listed = np.concatenate([e.tokens for e in cache._entries.values()] + [np.zeros(0, np.int64)])
    np.testing.assert_array_equal(np.bincount(listed, minlength=len(cache._refs)), cache._refs)
    assert len(np.unique(cache._free[: cache._top])) == cache._top == int((cache._refs == 0).sum())


def _stored(policy, cache, prompts, samples=3):
    torch.manual_seed(0)
    groups = policy.generate(prompts, num_samples=samples, temperature=1.0, max_new_tokens=40, stop=None,
                             head_stop=STOP, prefix_cache=cache)
    return _contexts(prompts, groups)


@pytest.mark.parametrize("samples", [1, 3, "mixed", "mixed-torch"])
def test_contexts_from_the_cache_generate_what_fresh_prompts_do(trained_model_dir, device, samples, monkeypatch):
    """Uniform or mixed numbers of samples per prompt (mixed: 1, 2 or 3; also with the torch
    copies on the CPU)."""
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(3), 10)]
    cache = policy.prefix_cache()
    contexts = _stored(policy, cache, prompts)
    assert len(contexts) >= 10 and all(c in cache for c in contexts)
    if samples == "mixed-torch":
        monkeypatch.setattr(kv_cache, "_numba_copies", lambda t: False)
    for batch in (contexts, contexts[:6] + prompts[:3]):  # all found (one position run); some not (a window)
        num = samples if isinstance(samples, int) else [1 + i % 3 for i in range(len(batch))]
        for temperature in (0.0, 1.0):
            torch.manual_seed(1)
            cached = policy.generate(batch, num_samples=num, temperature=temperature, max_new_tokens=30,
                                     stop=None, head_stop=STOP, prefix_cache=cache)
            torch.manual_seed(1)
            fresh = policy.generate(batch, num_samples=num, temperature=temperature, max_new_tokens=30,
                                    stop=None, head_stop=STOP)
            _same(cached, fresh)
            assert [len(g) for g in cached] == (num if isinstance(num, list) else [num] * len(batch))
    assert cache.hits >= 2 * (len(contexts) + 6)
    for text in contexts:  # an entry's ids are its text, its slots one per token but the last
        entry = cache.get(text)
        assert policy.tokenizer.decode(list(entry.ids)) == text and entry.length == len(entry.ids) - 1


def test_a_stop_stores_the_text_through_it(trained_model_dir, device):
    """Without a head, a sample that ended on the stop is stored with its prompt."""
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(4), 8)]
    cache = policy.prefix_cache()
    torch.manual_seed(0)
    groups = policy.generate(prompts, num_samples=2, temperature=1.0, max_new_tokens=30, stop=STOP, prefix_cache=cache)
    ended = [p + s.text for p, g in zip(prompts, groups) for s in g if s.text.endswith(STOP)]
    assert ended and all(c in cache for c in ended) and len(cache) == len(set(ended))
    _check_entries(policy, cache)  # rows copied out as they left the batch, on their stop
    assert policy.generate(ended, max_new_tokens=0, prefix_cache=cache)[0][0].num_tokens == 0
    _same(policy.generate(ended, temperature=0.0, max_new_tokens=20, prefix_cache=cache),
          policy.generate(ended, temperature=0.0, max_new_tokens=20))


def test_parked_samples_go_on_from_their_stored_context(trained_model_dir, device):
    """``park``: a batch returns once few rows still run, their heads closed. Until then it draws
    what the whole call draws; each parked sample, continued from its stored context (one position
    run), scores as one forward pass over its whole text scores it."""
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(3), 48)]
    kw = dict(num_samples=3, temperature=2.0, max_new_tokens=80, stop="7", head_stop=STOP)  # heads close early
    torch.manual_seed(6)
    whole = policy.generate(prompts, **kw)
    cache = policy.prefix_cache()
    torch.manual_seed(6)
    part = policy.generate(prompts, prefix_cache=cache, park=32, **kw)
    parked = [(p, s) for p, g in zip(prompts, part) for s in g if s.parked]
    assert 0 < len(parked) <= 32 and all(not s.finished and STOP in s.text for _, s in parked)
    for g_whole, g_part in zip(whole, part):
        for a, b in zip(g_whole, g_part):  # the same draws up to the return
            assert a.text.startswith(b.text) if b.parked else (a.text, a.finished) == (b.text, b.finished)
    assert all(p + s.text in cache for p, s in parked)
    _check_entries(policy, cache)
    hits = cache.hits
    rest = policy.generate([p + s.text for p, s in parked], temperature=2.0, prefix_cache=cache, stop="7",
                           head_stop=STOP, max_new_tokens=[80 - s.num_tokens for _, s in parked])
    assert cache.hits == hits + len(parked)
    assert max(s.num_tokens + g[0].num_tokens for (_, s), g in zip(parked, rest)) <= 80
    scored = []  # (prompt, parked text + what followed, its log-probability), without an end-of-sequence token
    for (p, s), (c,) in zip(parked, rest):
        if c.text.endswith("7") or not c.finished:
            scored.append((p, s.text + c.text, s.logprob + c.logprob))
        elif STOP in c.text:  # ended by end-of-sequence (not in the text): up to its head
            scored.append((p, s.text + c.text[: c.text.index(STOP) + 1], s.logprob + c.head_logprob))
    assert scored
    np.testing.assert_allclose(policy.logprobs([p for p, _, _ in scored], [t for _, t, _ in scored]),
                               [lp for *_, lp in scored], atol=1e-4)
    with pytest.raises(ValueError, match="park"):
        policy.generate(prompts, park=-1)


def test_children_share_their_parents_slots_and_copies_take_either_form(trained_model_dir, device, monkeypatch):
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(5), 8)]
    results = []
    forms = (True, False) if device.type == "cpu" else (False,)
    for numba in forms:  # the numba copies (CPU, float32) and the torch indexing (any device)
        if not numba:
            monkeypatch.setattr(kv_cache, "_numba_copies", lambda t: False)
        cache = policy.prefix_cache()
        contexts = _stored(policy, cache, prompts)
        torch.manual_seed(2)
        children = policy.generate(contexts, num_samples=2, temperature=1.0, max_new_tokens=30, stop=None,
                                   head_stop=STOP, prefix_cache=cache)
        grandchildren = [c for c in _contexts(contexts, children) if c in cache]
        assert len(grandchildren) >= 5
        # each child holds its parent's slots and copied only its own new tokens
        held = sum(cache.get(c).length for c in contexts + grandchildren)
        assert cache.nbytes < 0.8 * held * cache.token_bytes
        _check_entries(policy, cache)
        torch.manual_seed(3)
        results.append(policy.generate(grandchildren, num_samples=2, temperature=1.0, max_new_tokens=20, stop=None,
                                       head_stop=STOP, prefix_cache=cache))
        torch.manual_seed(3)
        _same(results[-1], policy.generate(grandchildren, num_samples=2, temperature=1.0, max_new_tokens=20,
                                           stop=None, head_stop=STOP))
    assert [[(s.text, s.logprob) for s in g] for g in results[0]] == [[(s.text, s.logprob) for s in g]
                                                                     for g in results[-1]]  # exact copies both ways


def test_a_small_cache_evicts_the_least_recently_used(trained_model_dir, device):
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(6), 12)]
    big = policy.prefix_cache()
    contexts = _stored(policy, big, prompts)
    budget = big.nbytes // 3  # a third of what the two calls below store (the samples are the same)
    small = policy.prefix_cache(budget)
    _stored(policy, small, prompts[:6])
    _stored(policy, small, prompts[6:])
    found = list(small._entries)  # the least recently used first
    assert len(found) >= 2 and small.evicted > 0 and small.nbytes <= budget
    evicted = small.evicted
    batch = found[len(found) // 2 :] + [c for c in contexts if c not in small][:4]  # read: the newer half
    torch.manual_seed(4)
    cached = policy.generate(batch, num_samples=3, temperature=1.0, max_new_tokens=30, stop=None, head_stop=STOP,
                             prefix_cache=small)
    torch.manual_seed(4)
    _same(cached, policy.generate(batch, num_samples=3, temperature=1.0, max_new_tokens=30, stop=None,
                                  head_stop=STOP))
    assert small.evicted > evicted and small.nbytes <= budget  # the call's own stores pushed out older entries
    assert found[0] not in small
    children = [c for c in _contexts(batch, cached) if c in small]
    assert children
    _check_entries(policy, small)
    _same(policy.generate(children, temperature=0.0, max_new_tokens=20, stop=None, head_stop=STOP, prefix_cache=small),
          policy.generate(children, temperature=0.0, max_new_tokens=20, stop=None, head_stop=STOP))


@pytest.mark.parametrize("fill", [False, True])
def test_growing_pools_keep_their_entries(trained_model_dir, device, fill, monkeypatch):
    """Pools grow as contexts come; every entry still holds what a forward pass computes. On the
    CPU, growth makes longer views of memory reserved once (nothing is copied, the same address);
    with deterministic filling of new memory (which would write the whole reservation), and off
    the CPU, the pools are copied into larger ones."""
    if fill:
        monkeypatch.setattr(prefix_cache, "_fills_new_memory", lambda: True)
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(6), 96)]
    cache = policy.prefix_cache()
    _stored(policy, cache, prompts[:16])
    sizes, address = [len(cache._refs)], cache.pools[0][0].data_ptr()
    for i in range(16, 96, 16):
        _stored(policy, cache, prompts[i : i + 16])
        sizes.append(len(cache._refs))
    assert sizes[-1] > sizes[0] and cache.evicted == 0  # it grew, and kept everything
    reserved = policy.device.type == "cpu" and not fill
    assert (cache.pools[0][0].data_ptr() == address) == reserved
    _check_entries(policy, cache)


def test_a_new_cache_takes_the_memory_of_the_policys_previous_one(trained_model_dir, device):
    """On the CPU a policy's prefix cache takes the pool memory of its previous one once that one
    is gone (its pages are mapped already), and holds what a cache of new memory holds; a cache
    made while another is in use gets memory of its own. Off the CPU nothing is handed on."""
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(7), 12)]
    first = policy.prefix_cache()
    _stored(policy, first, prompts[:6])
    address = first.pools[0][0].data_ptr()
    second = policy.prefix_cache()  # the first is still in use
    _stored(policy, second, prompts[:6])
    assert second.pools[0][0].data_ptr() != address
    del second  # its memory becomes the spare, then the first's replaces it
    first_ptrs = [t.data_ptr() for kv in first.pools for t in kv]
    del first
    reused = policy.prefix_cache()
    own = prefix_cache.PrefixCache(policy.model, 1 << 30)  # memory of its own
    contexts = _stored(policy, reused, prompts[6:])
    assert contexts == _stored(policy, own, prompts[6:]) and all(c in reused for c in contexts)
    on_cpu = policy.device.type == "cpu"
    assert ([t.data_ptr() for kv in reused.pools for t in kv] == first_ptrs) == on_cpu
    assert own.pools[0][0].data_ptr() != reused.pools[0][0].data_ptr()
    _check_entries(policy, reused)  # nothing of the first cache's contents is read
    _same(policy.generate(contexts, temperature=0.0, max_new_tokens=20, prefix_cache=reused),
          policy.generate(contexts, temperature=0.0, max_new_tokens=20, prefix_cache=own))
    assert reused.hits == own.hits == len(contexts)


def test_held_slots_outlive_their_evicted_entry(trained_model_dir, device):
    """A call holds the entries it reads (its rows' contexts share their slots): evicted meanwhile,
    their slots are not reused until it releases them."""
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(6), 12)]
    probe = policy.prefix_cache()
    _stored(policy, probe, prompts[:4])
    cache = policy.prefix_cache(probe.nbytes)  # room for the first four prompts' contexts, no more
    _stored(policy, cache, prompts[:4])
    assert cache.evicted == 0
    oldest = next(iter(cache._entries))  # the least recently used: the first to go
    entry = cache._entries[oldest]
    before = [(k[entry.tokens].clone(), v[entry.tokens].clone()) for k, v in cache.pools]
    cache.hold(entry.tokens)
    _stored(policy, cache, prompts[4:])
    assert oldest not in cache and cache.evicted > 0
    for (k, v), (k0, v0) in zip(cache.pools, before):
        assert torch.equal(k[entry.tokens], k0) and torch.equal(v[entry.tokens], v0)
    assert (cache._refs[entry.tokens] >= 1).all()
    cache.release(entry.tokens)
    _check_entries(policy, cache)


def test_a_full_cache_drops_no_entry_that_frees_nothing(trained_model_dir, device):
    """With every slot held (by a running call), storing more drops no entry: dropping them would
    free nothing. Once the holds are released, the least recently used entries make room."""
    policy = _policy(trained_model_dir, device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(6), 12)]
    probe = policy.prefix_cache()
    _stored(policy, probe, prompts[:4])
    cache = policy.prefix_cache(probe.nbytes)
    first = _stored(policy, cache, prompts[:4])
    held = [cache.get(c).tokens for c in first]
    for tokens in held:
        cache.hold(tokens)
    _stored(policy, cache, prompts[4:])
    assert list(cache._entries) == first and cache.evicted == 0  # nothing could be stored, nothing was dropped
    for tokens in held:
        cache.release(tokens)
    later = _stored(policy, cache, prompts[4:])
    assert cache.evicted > 0 and any(c in cache for c in later) and cache.nbytes <= probe.nbytes
    _check_entries(policy, cache)


def test_a_bf16_cache_continues_contexts_as_scoring_scores_them(trained_model_dir, device):
    """The torch copies on a bf16 model: a continued context's samples score as a full forward
    pass scores them (within bf16 rounding)."""
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir).to(device, torch.bfloat16).eval()
    policy = TransformersPolicy(model, tok, device=device)
    prompts = [t["prompt"] for t in islice(arithmetic_tasks(8), 6)]
    cache = policy.prefix_cache()
    contexts = _stored(policy, cache, prompts, samples=4)
    assert len(contexts) >= 6 and all(c in cache for c in contexts)
    torch.manual_seed(5)
    groups = policy.generate(contexts, num_samples=2, temperature=1.0, max_new_tokens=12, stop=None,
                             prefix_cache=cache)
    flat = [(c, s) for c, g in zip(contexts, groups) for s in g if not s.finished]  # not those ended by EOS
    assert len(flat) >= 6 and cache.hits >= len(contexts)
    scored = policy.logprobs([c for c, _ in flat], [s.text for _, s in flat])
    np.testing.assert_allclose(scored, [s.logprob for _, s in flat], atol=0.05)  # misplaced prefixes: > 2


def test_byte_level_bpe_stores_only_contexts_its_tokens_spell(device):
    """A token that runs on past the newline (``"\\n\\n"``, ``"\\nand"``) ends a head whose tokens
    do not spell the line: such a context is not stored; every stored one decodes to its text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["one line\n\nand the next\nand\n", "x = 4\n\n\ny = 5\nz\n"] * 20
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", clean_up_tokenization_spaces=False)
    fused = [t for t in tok.get_vocab() if "\n" in tok.decode([tok.convert_tokens_to_ids(t)])
             and not tok.decode([tok.convert_tokens_to_ids(t)]).endswith("\n")]
    assert fused  # tokens that run on past a newline exist
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_attention_heads=4,
                                         intermediate_size=64, num_hidden_layers=2, eos_token_id=None)).eval()
    policy = TransformersPolicy(model.to(device), tok, device=device)
    prompts = ["one line\n", "x = 4\n"]
    cache = policy.prefix_cache()
    torch.manual_seed(1)
    groups = policy.generate(prompts, num_samples=24, temperature=2.0, max_new_tokens=12, stop=None,
                             head_stop="\n", prefix_cache=cache)
    contexts = [p + s.text[: s.text.index("\n") + 1] for p, g in zip(prompts, groups) for s in g if "\n" in s.text]
    stored = [c for c in contexts if c in cache]
    assert stored and len(stored) < len(contexts)  # the others' newline tokens ran on past it
    for text in list(cache._entries):  # nothing else is stored, and each entry's ids spell its text
        assert text in contexts and tok.decode(list(cache.get(text).ids)) == text


def test_search_with_the_prefix_cache_builds_the_same_trees(trained_model_dir, device):
    policy = _policy(trained_model_dir, device)
    made = []
    original = policy.prefix_cache
    policy.prefix_cache = lambda *a, **k: made.append(original(*a, **k)) or made[-1]
    tasks = list(islice(arithmetic_tasks(7), 8))
    cfg = dataclasses.replace(TrainConfig(), tasks_per_iteration=8, simulations=4, park_rows=0)  # each round waits
    trees = []
    for mb in (0, 64):
        torch.manual_seed(0)
        trees.append(run_search(policy, MathEnv(max_steps=cfg.max_depth), tasks,
                                dataclasses.replace(cfg, prefix_cache_mb=mb)))
    assert len(made) == 1 and made[0].hits > 8  # later rounds' nodes were found in it
    assert [list(t) for t in trees[0].texts] == [list(t) for t in trees[1].texts]
    np.testing.assert_array_equal(trees[0].visits, trees[1].visits)
    np.testing.assert_allclose(trees[0].prior, trees[1].prior, atol=1e-5)


def test_prefix_cache_misuse_is_reported(trained_model_dir, device):
    policy = _policy(trained_model_dir, device)
    other = _policy(trained_model_dir, device)
    with pytest.raises(ValueError, match="another model"):
        policy.generate(["1+1\n"], prefix_cache=other.prefix_cache())
    with pytest.raises(ValueError, match="max_bytes"):
        policy.prefix_cache(-1)
    assert validate(dataclasses.replace(TrainConfig(), prefix_cache_mb=-1)) == [
        "--prefix-cache-mb must be >= 0, got -1"]
    assert validate(dataclasses.replace(TrainConfig(), park_rows=-2)) == ["--park-rows must be >= 0, got -2"]
    for wrong in (dict(leaf_eval="self-eval"), dict(rollouts=2), dict(prefix_cache_mb=0), dict(search="tot-bfs")):
        problems = validate(dataclasses.replace(TrainConfig(), park_rows=8, **wrong))
        assert any(p.startswith("--park-rows parks MCTS rollouts") for p in problems), wrong
