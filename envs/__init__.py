"""Text environments (Gymnasium API) whose actions are text steps, with their task sources and
verifiers."""

import gymnasium

from envs.code_env import CodeEnv, default_sandbox, split_completion, task_job
from envs.code_tasks import (
    CODE_LEVELS,
    code_task,
    code_tasks,
    heldout_code_tasks,
    humaneval_tasks,
    load_code_tasks,
    load_mbpp_jsonl,
)
from envs.dstc import ground_truth_pairs, minimax_pairs, minimax_select, pass_matrix
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
from envs.sandbox import ExecResult, Job, Sandbox, SandboxError, SandboxLimits
from envs.verifier import Verdict, answers_equal, equation_is_false, extract_answer, parse_number, verify

__all__ = [
    "ARITHMETIC_LEVELS",
    "CODE_LEVELS",
    "CodeEnv",
    "ExecResult",
    "Job",
    "Sandbox",
    "SandboxError",
    "SandboxLimits",
    "code_task",
    "code_tasks",
    "default_sandbox",
    "ground_truth_pairs",
    "heldout_code_tasks",
    "humaneval_tasks",
    "load_code_tasks",
    "load_mbpp_jsonl",
    "minimax_pairs",
    "minimax_select",
    "pass_matrix",
    "split_completion",
    "task_job",
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

ENV_IDS = {"math": "engine/Math-v0", "code": "engine/Code-v0"}
"""Short names used by the CLI mapped to registered Gymnasium ids."""

if "engine/Math-v0" not in gymnasium.registry:
    gymnasium.register(id="engine/Math-v0", entry_point="envs.math_env:MathEnv")
if "engine/Code-v0" not in gymnasium.registry:
    gymnasium.register(id="engine/Code-v0", entry_point="envs.code_env:CodeEnv")
