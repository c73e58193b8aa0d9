import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs import MathEnv, TaskFileError, arithmetic_task, heldout_arithmetic_tasks, load_tasks


@pytest.mark.parametrize("env_id", sorted(envs.ENV_IDS.values()))
def test_registered_envs_pass_check_env(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=False)


def test_reference_solution_earns_reward():
    env = MathEnv()
    rng = np.random.default_rng(1)
    for level in (2, 3, 4, 5):
        task = arithmetic_task(rng, level)
        assert len(task["solution"].splitlines()) == level + 1
        obs, info = env.reset(options={"task": task})
        assert obs == task["prompt"]
        lines = task["solution"].splitlines()
        for i, line in enumerate(lines):
            obs, reward, terminated, truncated, info = env.step(line)
            assert terminated == (i == len(lines) - 1)
        assert reward == 1.0 and info["correct"] and not truncated
        assert obs == task["prompt"] + task["solution"]


def test_wrong_answer_and_step_limit():
    env = MathEnv(max_steps=3)
    task = {"prompt": "1+1\n", "answer": "2", "task_id": "t"}
    env.reset(options={"task": task})
    _, r, term, trunc, info = env.step("#### 3")
    assert (r, term, trunc, info["correct"]) == (0.0, True, False, False)
    env.reset(options={"task": task})
    for _ in range(2):
        assert env.step("1+1=2")[3] is False
    _, r, term, trunc, info = env.step("still going")
    assert trunc and not term and info["verdict"] == "step limit reached"


@pytest.mark.parametrize("junk", ["", "   ", None, 12, b"bytes", "x" * 10_000, "\x00\x01", ["a"]])
def test_junk_actions_never_raise(junk):
    env = MathEnv(max_steps=2)
    obs0, _ = env.reset(seed=3)
    obs, reward, term, trunc, info = env.step(junk)
    assert reward == 0.0 and not term
    if junk == "\x00\x01":
        assert obs.endswith("??\n")
    else:
        assert "invalid_action" in info and obs == obs0
    assert env.observation_space.contains(obs)


def test_state_round_trip_branches():
    env = MathEnv()
    env.reset(seed=0)
    env.step("1+1=2")
    state = env.get_state()
    a = env.step("#### 2")[0]
    env.set_state(state)
    b = env.step("#### 5")[0]
    assert a != b and a.rsplit("\n", 2)[0] == b.rsplit("\n", 2)[0]


def test_seeded_reset_is_deterministic():
    a, b = MathEnv(), MathEnv()
    assert a.reset(seed=7)[0] == b.reset(seed=7)[0]


def test_heldout_is_fixed_and_balanced():
    h1, h2 = heldout_arithmetic_tasks(100), heldout_arithmetic_tasks(100)
    assert h1 == h2
    assert len({t["prompt"] for t in h1}) == 100
    assert [sum(t["level"] == lv for t in h1) for lv in (2, 3, 4, 5)] == [25, 25, 25, 25]
    for t in h1:  # values stay in 0..999
        for line in t["solution"].splitlines()[:-1]:
            assert 0 <= int(line.split("=")[1]) <= 999


def test_gsm8k_and_math_files(tmp_path):
    g = tmp_path / "gsm.jsonl"
    g.write_text(json.dumps({"question": "2 apples and 3 more?", "answer": "2+3=5\n#### 1,005"}) + "\n")
    (task,) = load_tasks(g)
    assert task["answer"] == "1005" and task["prompt"].startswith("Question: 2 apples")
    m = tmp_path / "math.jsonl"
    m.write_text(json.dumps({"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 3"}))
    (task,) = load_tasks(m)
    assert task["answer"] == "\\frac{1}{2}" and task["level"] == 3
    env = MathEnv(task_file=str(m))
    env.reset(seed=0)
    assert env.step("#### 0.5")[1] == 1.0


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json\n", "line"),
        (json.dumps({"question": "q"}) + "\n", "missing string field"),
        (json.dumps({"question": "q", "answer": "no final line"}) + "\n", "####"),
        ("", "empty"),
        (json.dumps({"foo": 1}) + "\n", "unknown format"),
    ],
)
def test_bad_task_files_have_clear_errors(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(TaskFileError, match=needle):
        load_tasks(p)


def test_missing_task_file():
    with pytest.raises(TaskFileError, match="does not exist"):
        load_tasks("/nonexistent/file.jsonl")


def test_check_work_voids_a_lucky_answer():
    task = {"prompt": "(1+2)*3\n", "answer": "9", "task_id": "t"}
    env = MathEnv()
    env.reset(options={"task": task})
    env.step("1+2=4")  # false line
    env.step("3*3=9")
    _, reward, term, _, info = env.step("#### 9")
    assert term and reward == 0.0 and not info["correct"] and "step 1" in info["verdict"]
    lenient = MathEnv(check_work=False)
    lenient.reset(options={"task": task})
    for line in ("1+2=4", "3*3=9", "#### 9"):
        _, reward, *_ = lenient.step(line)
    assert reward == 1.0


def test_state_carries_the_wrong_step():
    env = MathEnv()
    env.reset(options={"task": {"prompt": "1+1\n", "answer": "2"}})
    env.step("1+1=3")
    state = env.get_state()
    env.reset(options={"task": {"prompt": "1+1\n", "answer": "2"}})
    env.set_state(state)
    assert env.step("#### 2")[1] == 0.0


def test_sanitise_matches_the_charset():
    from envs.math_env import TEXT_CHARSET, _sanitise

    rng = np.random.default_rng(0)
    for _ in range(200):
        text = "".join(chr(int(c)) for c in rng.integers(0, 0x3100, 40))
        assert _sanitise(text) == "".join(c if c in TEXT_CHARSET else "?" for c in text)


def test_observation_is_the_sanitised_prompt_and_steps_of_the_current_task():
    env = MathEnv(render_mode="ansi")
    task = {"prompt": "2+2\x00\n", "answer": "4"}
    obs, _ = env.reset(options={"task": task})
    assert obs == "2+2?\n"
    assert env.step("2+2=4\x07")[0] == "2+2?\n2+2=4?\n"  # a step is sanitised as it is taken
    task["prompt"] = "3+3\n"  # the same task dict, edited in place
    assert env.reset(options={"task": task})[0] == "3+3\n"
    other = (dict(task, prompt="5+5\u00ff\n"), ("5+5=10",), False, 0)
    env.set_state(other)  # a restored state of another task observes that task's prompt
    assert env.render() == "5+5\u00ff\n5+5=10\n"
