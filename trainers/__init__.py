"""Preference trainers: losses, collation of records into token ids, and the training loop.

Receives a model, a tokenizer and records in the schema of DESIGN.md; imports nothing else of ours.
"""

from trainers.collate import CollateStats, TokenizedPair, pad_sequences, tokenize_pairs
from trainers.dpo import DPOConfig, sequence_logps, train_dpo
from trainers.losses import dpo_loss, implicit_rewards

__all__ = [
    "CollateStats",
    "DPOConfig",
    "TokenizedPair",
    "dpo_loss",
    "implicit_rewards",
    "pad_sequences",
    "sequence_logps",
    "tokenize_pairs",
    "train_dpo",
]
