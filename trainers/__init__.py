"""Preference trainers: losses, collation of records into token ids, prefix-shared packing, and the
training loop (DPO, step-DPO, TPO).

Receives a model, a tokenizer and records in the schema of DESIGN.md; imports nothing else of ours.
"""

from trainers.collate import CollateStats, TokenizedPair, pad_sequences, split_steps, tokenize_groups, tokenize_pairs
from trainers.dpo import sequence_logps, train_dpo
from trainers.interop import from_step_dpo, read_step_dpo, to_trl, write_trl_jsonl
from trainers.loop import DPOConfig
from trainers.losses import (
    LOSSES,
    adaptive_step_rewards,
    dpo_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    lambda_weights,
    listwise_loss,
    nll_loss,
    preference_loss,
    robust_dpo_loss,
    step_weights,
)
from trainers.packing import Group, PackedBatch, Scorer, pack_groups, prefix_sharing_matches
from trainers.tpo import train_tpo

__all__ = [
    "LOSSES",
    "CollateStats",
    "DPOConfig",
    "Group",
    "PackedBatch",
    "Scorer",
    "TokenizedPair",
    "adaptive_step_rewards",
    "dpo_loss",
    "from_step_dpo",
    "hinge_loss",
    "implicit_rewards",
    "ipo_loss",
    "lambda_weights",
    "listwise_loss",
    "nll_loss",
    "pack_groups",
    "pad_sequences",
    "prefix_sharing_matches",
    "preference_loss",
    "read_step_dpo",
    "robust_dpo_loss",
    "sequence_logps",
    "split_steps",
    "step_weights",
    "to_trl",
    "tokenize_groups",
    "tokenize_pairs",
    "train_dpo",
    "train_tpo",
    "write_trl_jsonl",
]
