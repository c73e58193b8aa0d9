import numpy as np

from engine.policy import TransformersPolicy
from trainers import DPOConfig, train_tpo


def _lists():
    return [{"prompt": f"{a}+{b}\n", "prefix": "",
             "responses": [f"{a}+{b}={a + b + 2}\n", f"{a}+{b}={a + b}\n#### {a + b}\n", f"{a}+{b}={a + b + 1}\n"],
             "scores": [0.0, 1.0, 0.4]} for a in range(10, 18) for b in (2, 3)]


def test_tpo_gradient_step_raises_top_over_bottom(tiny_random):
    """One small step of TPO moves the best member's log-ratio above the worst member's."""
    model, tok = tiny_random
    recs = _lists()
    policy = TransformersPolicy(model, tok)
    prompts = [r["prompt"] for r in recs]
    best = [r["responses"][1] for r in recs]
    worst = [r["responses"][0] for r in recs]
    before = policy.logprobs(prompts, best) - policy.logprobs(prompts, worst)
    summary = train_tpo(model, tok, recs, DPOConfig(lr=1e-3, epochs=1, batch_size=len(recs), warmup_steps=1,
                                                    beta=0.1))
    after = policy.logprobs(prompts, best) - policy.logprobs(prompts, worst)
    assert len(summary["steps"]) == 1 and summary["prefix_sharing"]
    assert float(np.mean(after - before)) > 0  # relative log-ratio of top vs bottom went up


def test_tpo_training_raises_margin_and_reports_metrics(tiny_random):
    model, tok = tiny_random
    recs = _lists()
    summary = train_tpo(model, tok, recs, DPOConfig(lr=3e-3, epochs=6, batch_size=8, beta=0.1))
    first, last = summary["steps"][0], summary["steps"][-1]
    assert last["loss"] < first["loss"]
    assert last["rewards/margins"] > 0.2 and last["rewards/accuracies"] > 0.9
    assert summary["lists"] == len(recs)


def test_tpo_rejects_bad_lists(tiny_random):
    model, tok = tiny_random
    import pytest

    with pytest.raises(ValueError, match="at least 2 responses"):
        train_tpo(model, tok, [{"prompt": "1\n", "prefix": "", "responses": ["a\n"], "scores": [1.0]}])


def test_tpo_without_adaptive_steps_matches_dpo_on_pairs(tiny_random):
    """On two-member lists with uniform step weights, TPO's loss is the lambda weight times DPO's."""
    import math

    from trainers import train_dpo

    model, tok = tiny_random
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pairs = [{"prompt": f"{a}+1\n", "prefix": "", "chosen": f"{a}+1={a + 1}\n", "rejected": f"{a}+1={a + 2}\n"}
             for a in range(10, 18)]
    lists = [{"prompt": p["prompt"], "prefix": "", "responses": [p["chosen"], p["rejected"]], "scores": [1.0, 0.0]}
             for p in pairs]
    cfg = DPOConfig(lr=1e-3, epochs=1, batch_size=8, beta=0.1, adaptive_steps=False)
    d = train_dpo(model, tok, pairs, cfg)["steps"][0]["loss"]
    model.load_state_dict(state)
    t = train_tpo(model, tok, lists, cfg)["steps"][0]["loss"]
    assert abs(t - d * (1 - 1 / math.log2(3))) < 1e-6
