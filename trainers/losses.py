"""Preference losses as pure functions of summed log-probabilities.

All take tensors of shape ``[B]``: the policy's and the frozen reference's log-probabilities of the
chosen and rejected continuations, and return per-record losses ``[B]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "adaptive_step_rewards", "dpo_loss", "hinge_loss", "implicit_rewards", "ipo_loss",
           "lambda_weights", "listwise_loss", "nll_loss", "preference_loss", "robust_dpo_loss", "step_weights"]


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))``."""
    return beta * (policy_logps - reference_logps)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO, sigmoid form (Rafailov et al., 2023, eq. 7), per record:

        -log sigmoid(beta * h),  h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).

    With ``label_smoothing = eps > 0`` this is conservative DPO (Mitchell, 2023):
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. Used on step-level records it
    is step-DPO (Lai et al., 2024).
    """
    _check_eps(label_smoothing)
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _check_eps(eps) -> None:
    """``eps`` is a float or a per-record tensor of flip rates; each must lie in [0, 0.5)."""
    bad = not 0.0 <= eps < 0.5 if isinstance(eps, float | int) else bool(((eps < 0) | (eps >= 0.5)).any())
    if bad:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")


def _h(policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> torch.Tensor:
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def ipo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float = 0.1):
    """IPO (Azar et al., 2023, eq. 17): ``(h - 1 / (2 beta))^2``; regresses the log-ratio gap to a
    fixed margin instead of pushing it to infinity."""
    return (_h(policy_chosen, policy_rejected, reference_chosen, reference_rejected) - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float = 0.1):
    """Hinge / SLiC (Zhao et al., 2023): ``max(0, 1 - beta * h)``."""
    return torch.relu(1.0 - beta * _h(policy_chosen, policy_rejected, reference_chosen, reference_rejected))


def robust_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, *, beta: float = 0.1,
                    label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al., 2024, eq. 8), unbiased under preference flips with rate
    ``eps = label_smoothing``: ``((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps)``, ``l(h) = -log sigmoid(beta h)``."""
    _check_eps(label_smoothing)
    h = _h(policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    eps = label_smoothing
    return ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)


LOSSES = ("sigmoid", "ipo", "hinge", "robust")
"""Names accepted by :func:`preference_loss`."""


def preference_loss(kind: str, policy_chosen, policy_rejected, reference_chosen, reference_rejected, *,
                    beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-record loss of the named kind: ``sigmoid`` (DPO; conservative DPO with label smoothing),
    ``ipo``, ``hinge`` or ``robust``."""
    args = (policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if kind == "sigmoid":
        return dpo_loss(*args, beta=beta, label_smoothing=label_smoothing)
    if kind == "ipo":
        return ipo_loss(*args, beta=beta)
    if kind == "hinge":
        return hinge_loss(*args, beta=beta)
    if kind == "robust":
        return robust_dpo_loss(*args, beta=beta, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def nll_loss(token_logps: torch.Tensor) -> torch.Tensor:
    """SFT term of RPO (Pang et al., 2024, eq. 2), normalised per token: ``-mean(log pi(token))``
    over the given continuation tokens."""
    return -token_logps.sum() / max(token_logps.numel(), 1)


def lambda_weights(scores: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """LiPO-lambda pair weights (Liu et al., 2024, "LiPO", eq. 8, from LambdaLoss):
    ``Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|`` with gain ``G = 2^score - 1`` and discount
    ``D(tau) = log2(1 + tau)``, ``tau`` the 1-based rank of each member under the current
    ``rewards`` (detached). Shape ``[N, N]`` for a list of ``N``."""
    gain = torch.pow(2.0, scores) - 1.0
    order = torch.argsort(rewards.detach(), descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1, device=order.device)
    inv_disc = 1.0 / torch.log2(1.0 + rank.to(scores.dtype))
    return (gain[:, None] - gain[None, :]).abs() * (inv_disc[:, None] - inv_disc[None, :]).abs()


def listwise_loss(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """LiPO-lambda listwise loss for one list (Liu et al., 2024, eq. 7), scalar:

        sum over pairs with score_i > score_j of  -Delta_ij * log sigmoid(r_i - r_j),

    divided by the number of such pairs. ``rewards`` are implicit rewards
    ``beta * log(pi / pi_ref)`` ``[N]``; ``scores`` the list's labels (higher is better) ``[N]``.
    Minimising it raises the reward of higher-scored members relative to lower-scored ones."""
    better = scores[:, None] > scores[None, :]
    if not bool(better.any()):
        return rewards.sum() * 0.0
    pair = -F.logsigmoid(rewards[:, None] - rewards[None, :])
    return (lambda_weights(scores, rewards) * pair)[better].sum() / better.sum()


def step_weights(step_repr: list[torch.Tensor]) -> list[torch.Tensor]:
    """TPO's adaptive step weights (Liao et al., 2025, "TPO", Sec. 3.3; the weighting of the
    authors' implementation): step ``k`` of member ``i`` gets ``1 + cos(e_ik, e_0k)``, the cosine
    similarity of its representation to that of the corresponding step of the top-scored member
    0 (so member 0's steps get 2, and a step member 0 lacks gets 1). ``step_repr[i]`` is
    ``[S_i, H]``; the weights are rescaled to mean 1 per member, so equal weights give back the
    plain summed log-ratio (DPO's implicit reward)."""
    top = step_repr[0]
    out = []
    for rep in step_repr:
        k = min(len(rep), len(top))
        w = torch.ones(len(rep), dtype=rep.dtype, device=rep.device)
        if k:
            w[:k] = 1.0 + F.cosine_similarity(rep[:k], top[:k], dim=-1)
        out.append(w / w.mean().clamp(min=1e-6))
    return out


def adaptive_step_rewards(step_logratios: list[torch.Tensor], step_repr: list[torch.Tensor] | None, *,
                          beta: float) -> torch.Tensor:
    """Implicit rewards of a list's members from per-step log-ratios ``log pi - log pi_ref``
    (``step_logratios[i]`` is ``[S_i]``), each step weighted by :func:`step_weights` of the
    detached representations ``step_repr`` (uniform when None): ``r_i = beta * sum_k w_ik * l_ik``."""
    if step_repr is None:
        return beta * torch.stack([lr.sum() for lr in step_logratios])
    weights = step_weights([r.detach() for r in step_repr])
    return beta * torch.stack([(w * lr).sum() for w, lr in zip(weights, step_logratios)])
