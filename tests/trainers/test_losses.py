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
