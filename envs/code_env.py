"""Write a function body one line at a time, then (in self-test mode) its own assert tests; the sandbox
runs them.

The text protocol (shared by :class:`CodeEnv` and :func:`split_completion`):

- body phase: an indented (or blank) line is a body line; ``# end`` ends the episode; an ``assert ...``
  line starts the test phase in self-test mode (and ends the body otherwise); any other unindented
  line ends the episode (as HumanEval's stop sequences ``\\ndef``, ``\\nclass``, ``\\nif`` do);
- test phase: each ``assert ...`` line is one test; ``# end`` (or ``max_tests`` tests) ends the episode.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.code_tasks import CODE_LEVELS, code_task, load_code_tasks
from envs.math_env import MAX_OBS_CHARS, TEXT_CHARSET, _sanitise
from envs.sandbox import Job, Sandbox

__all__ = ["CodeEnv", "END", "default_sandbox", "program", "split_completion", "task_job"]

END = "# end"
MAX_LINE_CHARS = 400
_ASSERT = re.compile(r"^assert\b")
_lock = threading.Lock()
_default: Sandbox | None = None


def default_sandbox() -> Sandbox:
    """One process-wide :class:`Sandbox` (created on first use, strongest mechanism available)."""
    global _default
    with _lock:
        if _default is None:
            _default = Sandbox()
        return _default


def program(task: dict, body: str) -> str:
    """The candidate program: the task's prompt followed by the written body."""
    return task["prompt"] + body


def task_job(task: dict, body: str, tests=None) -> Job:
    """A sandbox job running ``body`` against ``tests`` (default: the task's ground-truth tests)."""
    return Job(program(task, body), tuple(task["tests"] if tests is None else tests), task["entry_point"],
               context=task.get("context", ""))


def classify(line: str, phase: str, self_test: bool) -> str:
    """What a line does in ``phase`` ("body" or "tests"): body, test, end, or invalid."""
    stripped = line.strip()
    if stripped == END:
        return "end"
    if phase == "body":
        if not stripped or line[0] in " \t":
            return "body"
        if _ASSERT.match(stripped):
            return "test" if self_test else "end"
        return "end"
    return "test" if _ASSERT.match(stripped) else "invalid"


def split_completion(text: str, *, self_test: bool = True, max_tests: int = 8) -> tuple[str, list[str], bool]:
    """(body, tests, ended) from a whole completion, line by line as :class:`CodeEnv` reads it."""
    body, tests, phase = [], [], "body"
    for line in text.split("\n"):
        kind = classify(line, phase, self_test)
        if kind == "end":
            return "".join(body), tests, True
        if kind == "body":
            if line.strip():
                body.append(line + "\n")
        elif kind == "test":
            phase = "tests"
            tests.append(line.strip())
            if len(tests) >= max_tests:
                return "".join(body), tests, True
    return "".join(body), tests, False


class CodeEnv(gym.Env):
    """Complete a Python function from its signature and docstring, line by line.

    ## Action Space
    ``Text``: one line. Body lines are indented; in self-test mode ``assert ...`` lines are the model's
    own tests; ``# end`` ends the episode (see the module docstring for the whole protocol). A line that
    is not a string, too long, or (in the test phase) not an assert is an *invalid action*: the
    observation is unchanged, ``info["invalid_action"]`` says why, and it still counts as a step.

    ## Observation Space
    ``Text``: the prompt followed by the lines written so far.

    ## Rewards
    On the last step: 1.0 when the body passes every ground-truth test of the task (``reward_tests=
    "ground-truth"``, the default when the task has tests), or every one of its own tests (``"self"``, at
    least one test needed); 0.0 otherwise. ``info`` carries ``passed`` (ground truth, or None),
    ``own_passed`` (per own test) and ``correct``.

    ## Episode End
    Terminated by ``# end``, an unindented non-assert line, or ``max_tests`` tests; truncated after
    ``max_steps`` steps.

    ## Arguments
    ``levels``: families of generated tasks; ``task_source``: ``"humaneval"`` or an MBPP JSONL path
    instead; ``self_test``: ask for the model's own tests; ``sandbox``: a :class:`envs.sandbox.Sandbox`
    (default: one shared per process).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, levels: tuple[str, ...] = CODE_LEVELS, task_source: str | None = None, self_test: bool = True,
                 reward_tests: str = "auto", max_steps: int = 16, max_tests: int = 8, sandbox: Sandbox | None = None,
                 render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None")
        if reward_tests not in ("auto", "ground-truth", "self"):
            raise ValueError(f"reward_tests must be 'auto', 'ground-truth' or 'self', got {reward_tests!r}")
        self.render_mode = render_mode
        self.levels = tuple(levels)
        self.self_test, self.reward_tests = bool(self_test), reward_tests
        self.max_steps, self.max_tests = int(max_steps), int(max_tests)
        self._sandbox = sandbox
        self._file_tasks = load_code_tasks(task_source) if task_source else None
        self.observation_space = spaces.Text(max_length=MAX_OBS_CHARS, charset=TEXT_CHARSET)
        self.action_space = spaces.Text(max_length=MAX_LINE_CHARS, charset=TEXT_CHARSET)
        self._task: dict | None = None
        self._lines: tuple[str, ...] = ()
        self._tests: tuple[str, ...] = ()
        self._phase, self._steps, self._done = "body", 0, False

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = default_sandbox()
        return self._sandbox

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        task = (options or {}).get("task")
        if task is None:
            if self._file_tasks is not None:
                task = self._file_tasks[int(self.np_random.integers(len(self._file_tasks)))]
            else:
                task = code_task(self.np_random, self.levels[int(self.np_random.integers(len(self.levels)))])
        elif not (isinstance(task, dict) and all(k in task for k in ("prompt", "entry_point", "tests"))):
            raise ValueError("options['task'] must be a dict with 'prompt', 'entry_point' and 'tests'")
        self._task, self._lines, self._tests = task, (), ()
        self._phase, self._steps, self._done = "body", 0, False
        return self._obs(), {"task_id": task.get("task_id", ""), "prompt": task["prompt"], "steps": 0}

    def step(self, action: Any):
        if self._task is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode has ended; call reset() to start a new one")
        self._steps += 1
        info: dict[str, Any] = {"task_id": self._task.get("task_id", "")}
        if isinstance(action, np.str_):
            action = str(action)
        problem, kind, line = None, "invalid", ""
        if not isinstance(action, str):
            problem = f"action must be a string, got {type(action).__name__}"
        else:
            line = _sanitise(action.split("\n", 1)[0].rstrip("\r"))
            if len(line) > MAX_LINE_CHARS:
                problem = f"action longer than {MAX_LINE_CHARS} characters"
            else:
                kind = classify(line, self._phase, self.self_test)
                if kind == "invalid":
                    problem = "in the test phase a line must be an 'assert ...' test or '# end'"
        terminated = False
        if problem is not None:
            info["invalid_action"] = problem
        elif kind == "body":
            self._lines += (line,)
        elif kind == "test":
            self._phase = "tests"
            self._lines += (line.strip(),)
            self._tests += (line.strip(),)
            terminated = len(self._tests) >= self.max_tests
        else:
            self._lines += (line,)
            terminated = True
        truncated = not terminated and self._steps >= self.max_steps
        reward = 0.0
        if terminated or truncated:
            reward = self._score(info)
        self._done = terminated or truncated
        info["steps"] = self._steps
        return self._obs(), reward, terminated, truncated, info

    def render(self):
        return self._obs() if self.render_mode == "ansi" else None

    # -- branching support ------------------------------------------------------------------------------
    def get_state(self) -> tuple:
        return (self._task, self._lines, self._tests, self._phase, self._steps, self._done)

    def set_state(self, state: tuple) -> None:
        self._task, self._lines, self._tests, self._phase, self._steps, self._done = state

    def body(self) -> str:
        """The body written so far (non-blank body lines)."""
        out = []
        for line in self._lines:
            if line in self._tests or line.strip() == END or (line and line[0] not in " \t"):
                break
            if line.strip():
                out.append(line + "\n")
        return "".join(out)

    # -- helpers ----------------------------------------------------------------------------------------
    def _score(self, info: dict) -> float:
        task, body = self._task, self.body()
        jobs = []
        if task["tests"]:
            jobs.append(task_job(task, body))
        if self._tests:
            jobs.append(task_job(task, body, self._tests))
        results = self.sandbox.run_many(jobs) if jobs else []
        gt = results.pop(0) if task["tests"] else None
        own = results.pop(0) if self._tests else None
        info["passed"] = gt.all_passed if gt is not None else None
        info["own_passed"] = list(own.passed) if own is not None else []
        use_gt = self.reward_tests == "ground-truth" or (self.reward_tests == "auto" and gt is not None)
        if use_gt:
            correct = gt is not None and gt.all_passed
        else:
            correct = own is not None and own.all_passed
        info["correct"] = bool(correct)
        info["answer"] = body
        return 1.0 if correct else 0.0

    def _obs(self) -> str:
        if self._task is None:
            return ""
        return _sanitise(self._task["prompt"] + "".join(line + "\n" for line in self._lines))[:MAX_OBS_CHARS]
