import math

import pytest
import torch

from trainers import dpo_loss, implicit_rewards


def test_dpo_loss_matches_formula():
    pc, pr, rc, rr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]), \
        torch.tensor([-1.5, -2.0])
    beta = 0.5
    got = dpo_loss(pc, pr, rc, rr, beta=beta)
    for i in range(2):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        assert got[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-beta * h.item()))), rel=1e-6)
    # hand value: h = 0.5 - (-0.5) = 1.0 -> -log sigmoid(0.5) = 0.474077
    assert got[0].item() == pytest.approx(0.4740769842, rel=1e-6)


def test_label_smoothing_matches_cdpo():
    pc, pr, rc, rr = map(torch.tensor, ([-1.0], [-2.0], [-1.5], [-1.5]))
    eps, beta = 0.2, 0.1
    z = beta * 1.0
    want = -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
    assert dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)


def test_gradient_raises_chosen_over_rejected():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0])).sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected


def test_implicit_rewards():
    assert implicit_rewards(torch.tensor([-1.0]), torch.tensor([-3.0]), 0.1).item() == pytest.approx(0.2)


ONE = tuple(map(torch.tensor, ([-1.0], [-2.0], [-1.5], [-1.5])))  # h = 0.5 - (-0.5) = 1.0


def test_ipo_hinge_robust_hand_values():
    from trainers import hinge_loss, ipo_loss, preference_loss, robust_dpo_loss

    assert ipo_loss(*ONE, beta=0.25).item() == pytest.approx((1.0 - 2.0) ** 2)
    assert hinge_loss(*ONE, beta=0.5).item() == pytest.approx(0.5)
    assert hinge_loss(*ONE, beta=2.0).item() == 0.0
    lw = -math.log(1 / (1 + math.exp(-0.1)))
    ll = -math.log(1 / (1 + math.exp(0.1)))
    assert robust_dpo_loss(*ONE, beta=0.1, label_smoothing=0.2).item() == pytest.approx((0.8 * lw - 0.2 * ll) / 0.6)
    assert robust_dpo_loss(*ONE, beta=0.1).item() == pytest.approx(dpo_loss(*ONE, beta=0.1).item())
    for kind in ("sigmoid", "ipo", "hinge", "robust"):
        assert preference_loss(kind, *ONE, beta=0.1).shape == (1,)
    with pytest.raises(ValueError, match="unknown loss"):
        preference_loss("bogus", *ONE, beta=0.1)


@pytest.mark.parametrize("kind", ["ipo", "hinge", "robust"])
def test_every_loss_prefers_chosen(kind):
    from trainers import preference_loss

    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    preference_loss(kind, pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1,
                    label_smoothing=0.1 if kind == "robust" else 0.0).sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_per_record_label_smoothing_tensor():
    pc, pr, rc, rr = map(torch.tensor, ([-1.0, -1.0], [-2.0, -2.0], [-1.5, -1.5], [-1.5, -1.5]))
    eps = torch.tensor([0.0, 0.2])
    got = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
    assert got[0].item() == pytest.approx(dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.1).item())
    smooth = dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], beta=0.1, label_smoothing=0.2)
    assert got[1].item() == pytest.approx(smooth.item())
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, label_smoothing=torch.tensor([0.0, 0.6]))


def test_nll_loss_hand_value():
    from trainers import nll_loss

    assert nll_loss(torch.tensor([-1.0, -2.0, -3.0])).item() == pytest.approx(2.0)


def test_lambda_weights_hand_values():
    from trainers import lambda_weights

    scores = torch.tensor([1.0, 0.5, 0.0])
    rewards = torch.tensor([0.0, 1.0, -1.0])  # current ranks: member 1 first, 0 second, 2 third
    w = lambda_weights(scores, rewards)
    gain = [2**1 - 1, 2**0.5 - 1, 0.0]
    inv = {0: 1 / math.log2(3), 1: 1 / math.log2(2), 2: 1 / math.log2(4)}
    for i in range(3):
        for j in range(3):
            assert w[i, j].item() == pytest.approx(abs(gain[i] - gain[j]) * abs(inv[i] - inv[j]), rel=1e-6)


def test_listwise_loss_hand_value_and_sign():
    from trainers import lambda_weights, listwise_loss

    scores = torch.tensor([1.0, 0.0])
    rewards = torch.tensor([0.3, 0.1], requires_grad=True)
    w01 = lambda_weights(scores, rewards.detach())[0, 1].item()
    # two members: one ordered pair, Delta = (2^1 - 1) * (1/log2(2) - 1/log2(3))
    assert w01 == pytest.approx(1.0 * (1.0 - 1.0 / math.log2(3)))
    loss = listwise_loss(rewards, scores)
    assert loss.item() == pytest.approx(w01 * -math.log(1 / (1 + math.exp(-0.2))), rel=1e-6)
    loss.backward()
    # descent raises the higher-scored member's reward relative to the lower one
    assert rewards.grad[0].item() < 0 < rewards.grad[1].item()
    # three members: a gradient step widens every correctly ordered gap
    r3 = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    s3 = torch.tensor([2.0, 1.0, 0.0])
    listwise_loss(r3, s3).backward()
    step = r3.detach() - 0.5 * r3.grad
    assert step[0] > step[1] > step[2]
    # ties only: no signal
    assert listwise_loss(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])).item() == 0.0


def test_step_weights_and_adaptive_rewards():
    from trainers import adaptive_step_rewards, step_weights

    top = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    other = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # step 0 same, step 1 orthogonal, step 2 unmatched
    w = step_weights([top, other])
    assert torch.allclose(w[0], torch.tensor([1.0, 1.0]))  # 2, 2 rescaled to mean 1
    raw = torch.tensor([2.0, 1.0, 1.0])  # 1 + cos: 2, 1; unmatched step: 1
    assert torch.allclose(w[1], raw / raw.mean())
    lr = [torch.tensor([0.5, -0.25]), torch.tensor([0.1, 0.2, 0.3])]
    got = adaptive_step_rewards(lr, [top, other], beta=0.5)
    assert got[0].item() == pytest.approx(0.5 * 0.25)
    assert got[1].item() == pytest.approx(0.5 * float((raw / raw.mean() * lr[1]).sum()))
    uniform = adaptive_step_rewards(lr, None, beta=0.5)  # uniform weights: DPO's summed log-ratio
    assert uniform.tolist() == pytest.approx([0.125, 0.3])
