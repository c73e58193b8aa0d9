"""Preference trainers: losses, collation of records into token ids, and the training loop.

Receives a model, a tokenizer and records in the schema of DESIGN.md; imports nothing else of ours.
"""

from trainers.collate import CollateStats, TokenizedPair, pad_sequences, split_steps, tokenize_groups, tokenize_pairs
from trainers.dpo import DPOConfig, sequence_logps, train_dpo
from trainers.losses import (
    LOSSES,
    dpo_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    preference_loss,
    robust_dpo_loss,
)

__all__ = [
    "LOSSES",
    "CollateStats",
    "DPOConfig",
    "TokenizedPair",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "preference_loss",
    "robust_dpo_loss",
    "implicit_rewards",
    "pad_sequences",
    "sequence_logps",
    "tokenize_pairs",
    "train_dpo",
]
