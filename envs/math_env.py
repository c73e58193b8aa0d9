"""Math word/arithmetic problems as a text environment whose actions are solution lines."""

from __future__ import annotations

import re
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.math_tasks import ARITHMETIC_LEVELS, arithmetic_task, load_tasks
from envs.verifier import equation_is_false, verify

__all__ = ["MathEnv", "TEXT_CHARSET"]

TEXT_CHARSET = frozenset(["\n", "\t"] + [chr(c) for c in range(32, 0x3000)])
"""Characters an observation or action may hold; anything else is replaced by ``?``."""

MAX_ACTION_CHARS = 512
MAX_OBS_CHARS = 65_536


_OUTSIDE_CHARSET = re.compile("[^\t\n\x20-\u2fff]")


def _sanitise(text: str) -> str:
    """``text`` with every character outside ``TEXT_CHARSET`` replaced by ``?``."""
    return _OUTSIDE_CHARSET.sub("?", text)


class MathEnv(gym.Env):
    """Solve a math problem one line at a time; the verifier scores the final answer.

    ## Action Space
    ``Text``: one line of solution text (``"45+23=68"``). A trailing newline is optional; text
    after the first newline is ignored. A line holding ``####`` states the final answer.
    Anything else (empty, too long, not a string) is an *invalid action*: the observation is
    unchanged, ``info["invalid_action"]`` says why, and it still counts as a step.

    ## Observation Space
    ``Text``: the prompt followed by the solution lines written so far, each ending in ``\\n``.

    ## Rewards
    1.0 on the step that states a correct final answer, 0.0 otherwise. With ``check_work`` (the
    default) the work is checked too: a line that is a false arithmetic equation (``17*3=41``)
    makes the final reward 0 even when the stated answer is right, so that a lucky answer after a
    wrong step never counts as a correct solution (``info["verdict"]`` says which step was wrong).
    Lines that are not pure arithmetic equations are not judged.

    ## Episode End
    Terminated on the line holding ``####``; truncated after ``max_steps`` steps.

    ## Arguments
    ``levels``: difficulty levels (number of operations) for generated tasks; ``task_file``: a
    GSM8K or MATH JSONL file to draw tasks from instead; ``max_steps``: the step limit.
    A specific task is chosen with ``reset(options={"task": task_dict})``.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        levels: tuple[int, ...] = ARITHMETIC_LEVELS,
        task_file: str | None = None,
        max_steps: int = 12,
        check_work: bool = True,
        render_mode: str | None = None,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        self.render_mode = render_mode
        self.levels = tuple(levels)
        self.max_steps = int(max_steps)
        self.check_work = bool(check_work)
        self._file_tasks = load_tasks(task_file) if task_file else None
        self.observation_space = spaces.Text(max_length=MAX_OBS_CHARS, charset=TEXT_CHARSET)
        self.action_space = spaces.Text(max_length=MAX_ACTION_CHARS, charset=TEXT_CHARSET)
        self._task: dict | None = None
        self._steps: tuple[str, ...] = ()
        self._done = False
        self._wrong_step = 0  # 1-based index of the first false equation, 0 when none
        self._prompt_of: str | None = None  # the prompt whose sanitised form is _clean_prompt
        self._clean_prompt = ""

    # -- Gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        task = (options or {}).get("task")
        if task is None:
            if self._file_tasks is not None:
                task = self._file_tasks[int(self.np_random.integers(len(self._file_tasks)))]
            else:
                level = self.levels[int(self.np_random.integers(len(self.levels)))]
                task = arithmetic_task(self.np_random, level)
        elif not (isinstance(task, dict) and isinstance(task.get("prompt"), str) and "answer" in task):
            raise ValueError("options['task'] must be a dict with at least 'prompt' and 'answer'")
        self._task = task
        self._steps = ()
        self._done = False
        self._wrong_step = 0
        return self._obs(), {"task_id": task.get("task_id", ""), "prompt": task["prompt"], "steps": 0}

    def step(self, action: Any):
        if self._task is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended; call reset() to start a new one")
        info: dict[str, Any] = {"task_id": self._task.get("task_id", "")}
        line, problem = self._parse_action(action)
        if problem is not None:
            self._steps = self._steps + ("",)  # an invalid action still uses up a step
            info["invalid_action"] = problem
            truncated = self._num_steps() >= self.max_steps
            self._done = truncated
            info["steps"] = self._num_steps()
            return self._obs(), 0.0, False, truncated, info
        self._steps = self._steps + (line,)
        if self.check_work and not self._wrong_step and equation_is_false(line):
            self._wrong_step = self._num_steps()
        terminated = "####" in line
        reward = 0.0
        if terminated:
            verdict = verify(self.solution_text(), self._task["answer"])
            correct, reason = verdict.correct, verdict.reason
            if correct and self._wrong_step:
                correct, reason = False, f"answer equal but step {self._wrong_step} is a false equation"
            reward = 1.0 if correct else 0.0
            info.update(answer=verdict.answer, correct=correct, verdict=reason)
        truncated = not terminated and self._num_steps() >= self.max_steps
        if truncated:
            info.update(answer=None, correct=False, verdict="step limit reached")
        self._done = terminated or truncated
        info["steps"] = self._num_steps()
        return self._obs(), reward, terminated, truncated, info

    def render(self):
        if self.render_mode == "ansi":
            return self._obs()
        return None

    # -- branching support for tree search -----------------------------------------------------
    def get_state(self) -> tuple:
        """A cheap, picklable snapshot: (task, steps, done, first wrong step)."""
        return (self._task, self._steps, self._done, self._wrong_step)

    def set_state(self, state: tuple) -> None:
        """Restore a snapshot taken by :meth:`get_state`."""
        self._task, self._steps, self._done, self._wrong_step = state

    def solution_text(self) -> str:
        """The solution written so far (valid lines only), each line ending in a newline."""
        lines = [s for s in self._steps if s]
        return "\n".join(lines) + "\n" if lines else ""

    # -- helpers -------------------------------------------------------------------------------
    def _num_steps(self) -> int:
        return len(self._steps)

    def _obs(self) -> str:
        if self._task is None:
            return ""
        prompt = self._task["prompt"]
        if prompt is not self._prompt_of:  # solution lines are sanitised as they are taken
            self._prompt_of, self._clean_prompt = prompt, _sanitise(prompt)
        return (self._clean_prompt + self.solution_text())[:MAX_OBS_CHARS]

    @staticmethod
    def _parse_action(action: Any) -> tuple[str, str | None]:
        if isinstance(action, np.str_):
            action = str(action)
        if not isinstance(action, str):
            return "", f"action must be a string, got {type(action).__name__}"
        line = action.split("\n", 1)[0].rstrip("\r")
        if len(line) > MAX_ACTION_CHARS:
            return "", f"action longer than {MAX_ACTION_CHARS} characters"
        if not line.strip():
            return "", "empty action: write one line of the solution"
        return _sanitise(line), None
