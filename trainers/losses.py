"""Preference losses as pure functions of summed log-probabilities.

All take tensors of shape ``[B]``: the policy's and the frozen reference's log-probabilities of the
chosen and rejected continuations, and return per-record losses ``[B]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "dpo_loss", "hinge_loss", "implicit_rewards", "ipo_loss", "preference_loss", "robust_dpo_loss"]


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
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


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
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
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
