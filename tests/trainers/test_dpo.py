import numpy as np
import pytest
import torch

from engine.policy import TransformersPolicy
from trainers import DPOConfig, pad_sequences, sequence_logps, tokenize_pairs, train_dpo


def encode_chars(texts):
    return [[ord(c) for c in t] for t in texts]


def test_tokenize_pairs_boundaries_and_truncation():
    recs = [
        {"prompt": "abc\n", "prefix": "de\n", "chosen": "fg\n", "rejected": "x\n"},
        {"prompt": "p" * 50, "prefix": "", "chosen": "ok", "rejected": "no"},
        {"prompt": "p", "prefix": "", "chosen": "c" * 30, "rejected": "r"},
    ]
    pairs, stats = tokenize_pairs(recs, encode_chars, max_length=20)
    assert stats.kept == 2 and stats.truncated == 1 and stats.skipped == 1
    assert pairs[0].context == encode_chars(["abc\nde\n"])[0]
    assert pairs[0].chosen == encode_chars(["fg\n"])[0] and pairs[0].rejected == encode_chars(["x\n"])[0]
    assert len(pairs[1].context) == 18 and pairs[1].context[-1] == ord("p")  # cut from the left
    ids, attn, loss = pad_sequences([[1, 2], [3]], [[4], [5, 6]], pad_id=0)
    assert ids.tolist() == [[1, 2, 4], [3, 5, 6]] and loss.tolist() == [[0, 0, 1], [0, 1, 1]]
    assert attn.tolist() == [[1, 1, 1], [1, 1, 1]]


def test_sequence_logps_equal_policy_scores(tiny_random):
    model, tok = tiny_random
    policy = TransformersPolicy(model, tok)
    prompts, conts = ["12+3\n", "(1+2)*3\n1+2=3\n"], ["12+3=15\n", "3*3=9\n#### 9\n"]
    enc = lambda ts: [list(x) for x in tok(ts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    with torch.no_grad():
        got, lengths = sequence_logps(model, enc(prompts), enc(conts), tok.pad_token_id, torch.device("cpu"))
    np.testing.assert_allclose(got.numpy(), policy.logprobs(prompts, conts), rtol=1e-5, atol=1e-5)
    assert lengths.tolist() == [8, 13]


def test_train_dpo_raises_margin_and_writes_trl_metrics(tiny_random, device):
    model, tok = tiny_random
    recs = [{"prompt": f"{a}+{b}\n", "prefix": "", "chosen": f"{a}+{b}={a + b}\n", "rejected": f"{a}+{b}={a + b + 1}\n"}
            for a in range(3, 9) for b in range(2, 6)]
    model = model.to(device)
    policy = TransformersPolicy(model, tok, device=device)

    def margin():
        p = [r["prompt"] for r in recs]
        return float(np.mean(policy.logprobs(p, [r["chosen"] for r in recs])
                             - policy.logprobs(p, [r["rejected"] for r in recs])))

    before = margin()
    summary = train_dpo(model, tok, recs, DPOConfig(lr=3e-3, epochs=6, batch_size=8, beta=0.1))
    assert margin() > before + 0.5
    first, last = summary["steps"][0], summary["steps"][-1]
    assert last["loss"] < first["loss"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "loss"} <= set(last)
    assert summary["pairs"] == len(recs)


def test_train_dpo_rejects_bad_beta(tiny_random):
    model, tok = tiny_random
    with pytest.raises(ValueError, match="beta"):
        train_dpo(model, tok, [], DPOConfig(beta=0.0))


def test_sft_records_are_length_balanced_and_learned(tiny_random, device):
    from trainers.dpo import _tokenize_sft

    model, tok = tiny_random
    sft = [{"prompt": f"{a}+1\n", "steps": [f"{a}+1={a + 1}\n", f"#### {a + 1}\n"]} for a in range(10, 40)]
    sft += [{"prompt": f"({a}+1)*2\n", "steps": [f"{a}+1={a + 1}\n", f"{a + 1}*2={2 * a + 2}\n",
                                                f"#### {2 * a + 2}\n"]} for a in range(10, 13)]
    enc = lambda ts: [list(x) for x in tok(ts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    rows, p = _tokenize_sft(sft, enc, max_length=64)
    assert len(rows) == 33 and p[:30].sum() == pytest.approx(0.5) and p[30:].sum() == pytest.approx(0.5)
    model = model.to(device)
    policy = TransformersPolicy(model, tok, device=device)
    prompts, comps = [r["prompt"] for r in sft], ["".join(r["steps"]) for r in sft]
    before = policy.logprobs(prompts, comps).mean()
    pairs = [{"prompt": "1+1\n", "prefix": "", "chosen": "1+1=2\n", "rejected": "1+1=3\n"}] * 16
    train_dpo(model, tok, pairs, DPOConfig(lr=3e-3, epochs=3, batch_size=8, sft_weight=1.0, beta=0.01),
              sft_records=sft)
    assert policy.logprobs(prompts, comps).mean() > before + 5.0


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust"])
def test_train_with_other_losses_raises_margin(tiny_random, device, loss):
    model, tok = tiny_random
    recs = [{"prompt": f"{a}+1\n", "prefix": "", "chosen": f"{a}+1={a + 1}\n", "rejected": f"{a}+1={a + 2}\n"}
            for a in range(10, 26)]
    model = model.to(device)
    policy = TransformersPolicy(model, tok, device=device)
    p = [r["prompt"] for r in recs]

    def margin():
        return float(np.mean(policy.logprobs(p, [r["chosen"] for r in recs])
                             - policy.logprobs(p, [r["rejected"] for r in recs])))

    before = margin()
    train_dpo(model, tok, recs, DPOConfig(lr=3e-3, epochs=4, batch_size=8, beta=0.1, loss=loss,
                                          label_smoothing=0.1 if loss == "robust" else 0.0))
    assert margin() > before + 0.3
    with pytest.raises(ValueError, match="unknown loss"):
        train_dpo(model, tok, recs, DPOConfig(loss="nope"))
