"""The decoder's per-step kernels against their tensor forms."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.policy import TransformersPolicy
from engine.sampling import HASH_BASE, decode_step, move_rows, sample_inverse_cdf


def run_step(logits, u, inv_temperature, *, ends=(), heads=(), head_open=None, alive=None, track=True, t=2):
    n, vocab = logits.shape
    rows = np.arange(n)[::-1].copy()  # batch row i writes to output row n - 1 - i
    out_tok = np.full((n, 5), -1, np.int64)
    out_lp = np.zeros((n, 5), np.float32)
    alive = np.ones((n, 1), np.bool_) if alive is None else alive
    table = lambda ids: np.isin(np.arange(vocab), ids) if len(ids) else np.zeros(0, np.bool_)  # noqa: E731
    head_open = np.ones((n, 1), np.bool_) if head_open is None else head_open
    head_hash = np.full((n, 1), 7, np.int64)
    tok = np.zeros((n, 1), np.int64)
    closing = np.zeros(n, np.bool_)
    live, closed = decode_step(logits, u, inv_temperature, rows, t, out_tok, out_lp, alive, table(ends), table(heads),
                               head_open, head_hash, track, tok, closing)
    return dict(live=live, closed=closed, tok=tok[:, 0], out_tok=out_tok, out_lp=out_lp, alive=alive[:, 0],
                head_open=head_open[:, 0], head_hash=head_hash[:, 0], closing=closing, rows=rows)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 0.0])
def test_decode_step_draws_what_the_tensor_form_draws(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 9, generator=gen, dtype=torch.float64) * 2
    u = torch.rand(512, generator=gen, dtype=torch.float64)
    got = run_step(logits.float().numpy(), u.numpy(), 1 / temperature if temperature else 0.0)
    if temperature:
        # batch row i draws with its output row's uniform, u[rows[i]]
        want = sample_inverse_cdf(torch.softmax(logits / temperature, -1), u[torch.from_numpy(got["rows"])])[:, 0]
    else:
        want = logits.argmax(-1)
    assert (torch.from_numpy(got["tok"]) == want).float().mean() > 0.99  # float32 logits: rare ties at a boundary
    want_lp = torch.log_softmax(logits.float(), -1).gather(1, torch.from_numpy(got["tok"])[:, None])[:, 0]
    np.testing.assert_allclose(got["out_lp"][got["rows"], 2], want_lp.numpy(), atol=1e-5)
    assert (got["out_tok"][got["rows"], 2] == got["tok"]).all() and (got["out_tok"][:, [0, 1, 3, 4]] == -1).all()


def test_decode_step_draws_each_token_at_its_probability():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    logits = np.tile(np.log(np.maximum(probs, 1e-30)).astype(np.float32), (40_000, 1))
    logits[:, 1] = -np.inf  # probability 0 is never drawn
    got = run_step(logits, np.random.default_rng(0).random(40_000), 1.0)
    np.testing.assert_allclose(np.bincount(got["tok"], minlength=4) / 40_000, probs, atol=0.01)
    assert (got["tok"] != 1).all()


def test_decode_step_ends_rows_and_closes_heads():
    logits = np.full((4, 5), -10.0, np.float32)
    logits[[0, 1, 2, 3], [4, 3, 3, 1]] = 10.0  # greedy tokens 4, 3, 3, 1
    alive = np.array([[True], [True], [False], [True]])
    head_open = np.array([[True], [True], [True], [False]])
    got = run_step(logits, np.zeros(0), 0.0, ends=[4], heads=[3], head_open=head_open, alive=alive)
    assert got["tok"].tolist() == [4, 3, 3, 1]
    assert got["alive"].tolist() == [False, True, False, True] and got["live"] == 2  # token 4 ends row 0
    # row 1 closes its head; row 2 (already finished) hashes its token but is not judged; row 3's head was closed
    assert got["closing"].tolist() == [False, True, False, False] and got["closed"] == 1
    assert got["head_open"].tolist() == [True, False, True, False]
    assert got["head_hash"].tolist() == [7 * HASH_BASE + 4, 7 * HASH_BASE + 3, 7 * HASH_BASE + 3, 7]
    untracked = run_step(logits, np.zeros(0), 0.0, heads=[3], track=False)
    assert untracked["closed"] == 0 and (untracked["head_hash"] == 7).all() and untracked["live"] == 4


def test_move_rows_equals_index_copy():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 8, 2, 6, 3, generator=gen)
    holes, movers, starts = torch.tensor([1, 4]), torch.tensor([6, 7]), torch.tensor([0, 2])
    want_k, want_v = keys.clone(), values.clone()
    for buf in (want_k, want_v):
        buf[:, :, :4].index_copy_(0, holes, buf[:, :, :4].index_select(0, movers))
    before = keys[4, :, :2].clone()
    move_rows(keys.numpy(), values.numpy(), holes.numpy(), movers.numpy(), starts.numpy(), 4)
    assert torch.equal(keys[:, :, 2:], want_k[:, :, 2:]) and torch.equal(values[:, :, 2:], want_v[:, :, 2:])
    assert torch.equal(keys[1], want_k[1]) and torch.equal(values[1], want_v[1])  # start 0: every filled position
    assert torch.equal(keys[4, :, :2], before)  # a mover's left padding (before its start) is not copied
    assert not torch.equal(keys[1, :, 4:], keys[6, :, 4:])  # positions past the filled ones are left alone


@pytest.mark.parametrize("kw", [
    dict(num_samples=4, temperature=0.3, max_new_tokens=40, stop=None, head_stop="\n", unique_heads=True),
    dict(num_samples=2, temperature=0.0, max_new_tokens=30, stop="\n"),
    dict(num_samples=3, temperature=0.7, max_new_tokens=30, stop=None),
])
def test_fused_cpu_step_generates_what_the_tensor_form_generates(trained_model_dir, kw):
    policy = TransformersPolicy(AutoModelForCausalLM.from_pretrained(trained_model_dir),
                                AutoTokenizer.from_pretrained(trained_model_dir), batch_size=32)
    prompts = ["(12+5)*3\n", "((4+4)-2)*9\n4+4=8\n", "7*8\n", "(9-3)*(2+2)\n", "5+5\n", "((1+2)*3)-4\n"] * 2
    runs = []
    for fused in (True, False):
        policy.fused_cpu_step = fused
        torch.manual_seed(3)
        runs.append([s for g in policy.generate(prompts, **kw) for s in g])
    fused, tensor = runs
    fields = lambda s: (s.text, s.num_tokens, s.finished, s.head_tokens, s.duplicate)  # noqa: E731
    assert [fields(s) for s in fused] == [fields(s) for s in tensor]
    np.testing.assert_allclose([s.logprob for s in fused], [s.logprob for s in tensor], atol=1e-4)
    np.testing.assert_allclose([s.head_logprob for s in fused], [s.head_logprob for s in tensor], atol=1e-4)
    if kw.get("unique_heads"):
        assert any(s.duplicate for s in fused)  # the repeat cut ran on both paths
