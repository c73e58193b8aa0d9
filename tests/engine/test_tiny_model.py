import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.policy import TransformersPolicy
from engine.tiny_model import BootstrapConfig, bootstrap


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


def test_generate_logprobs_equal_scoring(trained_model_dir):
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir)
    policy = TransformersPolicy(model, tok)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n"]
    torch.manual_seed(0)
    samples = policy.generate(prompts, num_samples=3, temperature=1.0, max_new_tokens=12, stop="\n")
    flat = [(p, s) for p, group in zip(prompts, samples) for s in group]
    assert len(flat) == 6
    for _, s in flat:
        assert s.text.count("\n") <= 1 and (s.text.endswith("\n") or not s.finished or s.num_tokens == 12
                                            or s.text == "")
    scored = policy.logprobs([p for p, _ in flat], [s.text for _, s in flat])
    finished = [i for i, (_, s) in enumerate(flat) if s.finished and s.text.endswith("\n")]
    np.testing.assert_allclose(scored[finished], [flat[i][1].logprob for i in finished], rtol=1e-4, atol=1e-4)
    greedy1 = policy.generate(prompts, temperature=0.0, max_new_tokens=40, stop=None)
    greedy2 = policy.generate(prompts[::-1], temperature=0.0, max_new_tokens=40, stop=None)
    assert [g[0].text for g in greedy1] == [g[0].text for g in greedy2[::-1]]  # batching does not change greedy


def test_generate_shares_prompts_across_samples_and_batches(trained_model_dir):
    tok = AutoTokenizer.from_pretrained(trained_model_dir)
    model = AutoModelForCausalLM.from_pretrained(trained_model_dir)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n", "7*8\n"]
    wide = TransformersPolicy(model, tok)
    narrow = TransformersPolicy(model, tok, batch_size=2)  # one prompt (two rows) per batch
    shared = wide.generate(prompts, num_samples=2, temperature=0.0, max_new_tokens=30, stop=None)
    apart = narrow.generate([p for p in prompts for _ in range(2)], temperature=0.0, max_new_tokens=30, stop=None)
    assert [[s.text for s in g] for g in shared] == [[apart[2 * i][0].text, apart[2 * i + 1][0].text]
                                                     for i in range(len(prompts))]
    np.testing.assert_allclose([s.logprob for g in shared for s in g], [g[0].logprob for g in apart], atol=1e-4)
    torch.manual_seed(0)
    sampled = wide.generate(prompts[:1], num_samples=6, temperature=1.0, max_new_tokens=20, stop=None)[0]
    assert len({s.text for s in sampled}) > 1  # the copied cache rows are sampled independently
