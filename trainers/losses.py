"""Preference losses as pure functions of summed log-probabilities.

All take tensors of shape ``[B]``: the policy's and the frozen reference's log-probabilities of the
chosen and rejected continuations, and return per-record losses ``[B]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dpo_loss", "implicit_rewards"]


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
