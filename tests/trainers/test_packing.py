import pytest
import torch

from engine.policy import TransformersPolicy
from trainers import Group, Scorer, pack_groups, prefix_sharing_matches, tokenize_groups
from trainers.packing import member_sums


def _enc(tok):
    return lambda ts: [list(x) for x in tok(ts, add_special_tokens=False)["input_ids"]]


def _groups(tok):
    enc = _enc(tok)
    return [
        Group(enc(["12+3\n"])[0], enc(["12+3=15\n", "12+3=16\n", "1\n"])),
        Group(enc(["(1+2)*3\n1+2=3\n"])[0], enc(["3*3=9\n#### 9\n", "3*3=8\n"])),
        Group(enc(["7*8\n"])[0], enc(["7*8=56\n#### 56\n", "7*8=54\n#### 54\n"])),
        Group(enc(["((4+5)*2)-3\n4+5=9\n9*2=18\n"])[0], enc(["18-3=15\n", "18-3=14\n"])),
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", [1, 40, 4096])
def test_prefix_shared_logps_equal_unshared(tiny_random, attn, budget):
    model, tok = tiny_random
    model.config._attn_implementation = attn
    model.eval()
    groups = _groups(tok)
    shared = pack_groups(groups, pad_id=tok.pad_token_id, shared=True, token_budget=budget)
    plain = pack_groups(groups, pad_id=tok.pad_token_id, shared=False)
    assert shared.tokens < plain.tokens  # each context computed once
    with torch.no_grad():
        a, ha = Scorer(model)(shared, hidden=True)
        b, hb = Scorer(model)(plain, hidden=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(ha, hb, atol=1e-5, rtol=0)
    # and both equal the policy's own scoring of context + continuation, row by row
    prompts = [tok.decode(g.context) for g in groups for _ in g.continuations]
    conts = [tok.decode(c) for g in groups for c in g.continuations]
    want = TransformersPolicy(model, tok).logprobs(prompts, conts)
    torch.testing.assert_close(member_sums(a, shared), torch.tensor(want, dtype=a.dtype), atol=1e-5, rtol=0)


def test_prefix_shared_gradients_equal_unshared(tiny_random):
    model, tok = tiny_random
    groups = _groups(tok)
    grads = []
    for shared in (True, False):
        model.zero_grad()
        batch = pack_groups(groups, pad_id=tok.pad_token_id, shared=shared, token_budget=64)
        member_sums(Scorer(model)(batch)[0], batch).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_probe_accepts_4d_masks(tiny_random):
    model, tok = tiny_random
    assert prefix_sharing_matches(model, _groups(tok), pad_id=tok.pad_token_id)


def test_tokenize_groups_marks_steps_and_counts_cuts():
    enc = lambda ts: [[ord(c) for c in t] for t in ts]  # noqa: E731
    groups, kept, stats = tokenize_groups(["p" * 30, "ab\n", "q"], [["x\ny\n", "zz\n"], ["c" * 40, "d"], ["e", "f"]],
                                          enc, max_length=20, steps=True)
    assert kept == [0, 2] and stats.truncated == 1 and stats.skipped == 1
    assert groups[0].steps == [[2, 2], [3]] and groups[0].continuations[0] == enc(["x\ny\n"])[0]
    assert len(groups[0].context) == 16  # 20 - longest continuation (4), cut from the left
    batch = pack_groups(groups, pad_id=0, shared=True)
    assert batch.step.tolist()[:4] == [0, 0, 1, 1]
