"""Text environments (Gymnasium API) whose actions are text steps, with their task sources and
verifiers."""

import gymnasium

from envs.math_env import MathEnv
from envs.math_tasks import (
    ARITHMETIC_LEVELS,
    TaskFileError,
    arithmetic_task,
    arithmetic_tasks,
    heldout_arithmetic_tasks,
    load_gsm8k_jsonl,
    load_math_jsonl,
    load_tasks,
)
from envs.verifier import Verdict, answers_equal, equation_is_false, extract_answer, parse_number, verify

__all__ = [
    "ARITHMETIC_LEVELS",
    "ENV_IDS",
    "MathEnv",
    "TaskFileError",
    "Verdict",
    "answers_equal",
    "equation_is_false",
    "arithmetic_task",
    "arithmetic_tasks",
    "extract_answer",
    "heldout_arithmetic_tasks",
    "load_gsm8k_jsonl",
    "load_math_jsonl",
    "load_tasks",
    "parse_number",
    "verify",
]

ENV_IDS = {"math": "engine/Math-v0"}
"""Short names used by the CLI mapped to registered Gymnasium ids."""

if "engine/Math-v0" not in gymnasium.registry:
    gymnasium.register(id="engine/Math-v0", entry_point="envs.math_env:MathEnv")
