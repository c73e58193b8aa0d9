"""Greedy evaluation on a fixed set of tasks, judged by the environment's verifier."""

from __future__ import annotations

import numpy as np

from envs import verify

__all__ = ["evaluate"]


def evaluate(policy, tasks: list[dict], max_new_tokens: int) -> dict:
    """Greedy accuracy on ``tasks``, overall and per difficulty level, and the 0/1 outcome per task
    (in task order, for paired comparisons between iterations)."""
    samples = policy.generate([t["prompt"] for t in tasks], temperature=0.0, max_new_tokens=max_new_tokens,
                              stop=None)
    correct = np.array([verify(s[0].text, t["answer"]).correct for s, t in zip(samples, tasks)], float)
    levels = np.array([t.get("level", 0) for t in tasks])
    per_level = {str(int(lv)): float(correct[levels == lv].mean()) for lv in np.unique(levels)}
    return {"heldout_accuracy": float(correct.mean()), "heldout_by_level": per_level,
            "heldout_correct": correct.astype(int).tolist()}
