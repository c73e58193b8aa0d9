import json

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import (
    CODE_LEVELS,
    CodeEnv,
    TaskFileError,
    code_task,
    ground_truth_pairs,
    heldout_code_tasks,
    load_mbpp_jsonl,
    minimax_pairs,
    minimax_select,
    pass_matrix,
    split_completion,
    task_job,
)
from envs.code_env import default_sandbox


def test_code_env_passes_check_env():
    check_env(gym.make("engine/Code-v0").unwrapped, skip_render_check=False)


def test_procedural_canonical_solutions_pass_their_tests():
    rng = np.random.default_rng(0)
    tasks = [code_task(rng, lv) for lv in CODE_LEVELS for _ in range(6)]
    results = default_sandbox().run_many([task_job(t, t["canonical_solution"]) for t in tasks])
    assert all(r.all_passed for r in results), [(t["prompt"], r.reasons) for t, r in zip(tasks, results)
                                                if not r.all_passed]
    wrong = default_sandbox().run_many([task_job(t, "    return None\n") for t in tasks])
    assert not any(r.all_passed for r in wrong)


def test_heldout_is_fixed_and_distinct():
    a, b = heldout_code_tasks(40), heldout_code_tasks(40)
    assert [t["prompt"] for t in a] == [t["prompt"] for t in b]
    assert len({t["prompt"] for t in a}) == 40 and {t["level"] for t in a} == set(CODE_LEVELS)


def test_episode_with_own_tests():
    env = CodeEnv()
    task = code_task(np.random.default_rng(3), "int2")
    obs, _ = env.reset(options={"task": task})
    assert obs == task["prompt"]
    name = task["entry_point"]
    _, r, term, trunc, info = env.step(task["canonical_solution"].rstrip("\n"))
    assert (r, term, trunc) == (0.0, False, False)
    _, _, _, _, info = env.step("print('x')")  # wrong kind of line in the body phase ends the body...
    assert info.get("invalid_action") is None
    env.reset(options={"task": task})
    env.step(task["canonical_solution"].rstrip("\n"))
    good, bad = task["tests"][0], task["tests"][0].rsplit("==", 1)[0] + "== 'nope'"
    env.step(good)
    _, _, _, _, info = env.step("x = 1")
    assert "invalid_action" in info
    env.step(bad)
    _, r, term, _, info = env.step("# end")
    assert term and r == 1.0 and info["passed"] is True and info["own_passed"] == [True, False]
    assert name in obs


def test_self_reward_without_ground_truth():
    task = {**code_task(np.random.default_rng(5), "list"), "tests": ()}
    env = CodeEnv(reward_tests="auto")
    env.reset(options={"task": task})
    env.step(task["canonical_solution"].rstrip("\n"))
    _, r, term, _, info = env.step("# end")
    assert term and r == 0.0 and info["passed"] is None  # no tests at all: nothing is correct


def test_split_completion_follows_the_env_protocol():
    text = "    y = x + 1\n\n    return y\nassert f(1) == 2\nassert f(2) == 3\n# end\nassert f(3) == 0\n"
    assert split_completion(text) == ("    y = x + 1\n    return y\n", ["assert f(1) == 2", "assert f(2) == 3"], True)
    assert split_completion(text, self_test=False) == ("    y = x + 1\n    return y\n", [], True)
    assert split_completion("    return 1\ndef g():\n") == ("    return 1\n", [], True)
    assert split_completion("    return 1\n    ") == ("    return 1\n", [], False)


def test_minimax_on_hand_built_matrices():
    m = np.array([[1, 1, 0, 1],   # code 0 passes 3
                  [1, 0, 0, 0],   # code 1 passes 1
                  [1, 1, 0, 0],   # code 2 passes 2
                  [0, 0, 0, 0]],  # code 3 passes 0
                 dtype=bool)
    sel = minimax_select(m)
    assert (sel.chosen_code, sel.rejected_code) == (0, 3)
    # chosen test: among tests code 0 passes (0, 1, 3), the one fewest codes pass: test 3 (1 code)
    assert sel.chosen_tests == (3,)
    # rejected test: among tests code 3 fails (all), the one most codes pass: test 0 (3 codes)
    assert sel.rejected_tests == (0,)
    assert minimax_select(m, num_tests=2).chosen_tests == (3, 1)
    assert minimax_select(np.ones((3, 2), bool)) is None and minimax_select(np.zeros((0, 0))) is None
    assert minimax_select(np.zeros((3, 2), bool)) is None
    with pytest.raises(ValueError):
        minimax_select(np.zeros(3))


def test_pairs_concatenate_code_and_tests():
    task = {"prompt": "def f(x):\n", "task_id": "t"}
    codes = ["    return x\n", "    return 0\n"]
    tests = ["assert f(1) == 1", "assert f(0) == 0"]
    pairs = minimax_pairs(task, codes, tests, np.array([[1, 1], [0, 1]], bool))
    assert len(pairs) == 1
    p = pairs[0]
    assert p["chosen"] == "    return x\nassert f(1) == 1\n# end\n"
    # code 1 fails only test 0: that is the test concatenated to the rejected code
    assert p["rejected"] == "    return 0\nassert f(1) == 1\n# end\n"
    assert p["chosen_q"] == 1.0 and p["rejected_q"] == 0.5


def test_pass_matrix_and_ground_truth_pairs():
    task = code_task(np.random.default_rng(9), "int1")
    codes = [task["canonical_solution"], "    return -1\n"]
    m = pass_matrix(default_sandbox(), task, codes, list(task["tests"]))
    assert m.shape == (2, len(task["tests"])) and m[0].all() and not m[1].any()
    pairs = ground_truth_pairs(task, codes, [True, False])
    assert len(pairs) == 1 and pairs[0]["chosen"].startswith(codes[0]) and pairs[0]["source"] == "ground-truth"


def test_mbpp_loader_names_file_and_line(tmp_path):
    good = {"task_id": 2, "text": "Add two numbers.", "code": "def add(a, b):\n    return a + b\n",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(good) + "\n")
    (task,) = load_mbpp_jsonl(path)
    assert task["entry_point"] == "add" and task["prompt"].startswith("def add(a, b):\n")
    r = default_sandbox().run(task_job(task, "    return a + b\n"))
    assert r.passed == (True, True)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "test_list": "oops"}) + "\n")
    with pytest.raises(TaskFileError, match=r"mbpp.jsonl:2: 'test_list'"):
        load_mbpp_jsonl(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(TaskFileError, match=r"mbpp.jsonl:2: not valid JSON"):
        load_mbpp_jsonl(path)
    path.write_text(json.dumps({**good, "code": "x = 1"}) + "\n")
    with pytest.raises(TaskFileError, match=r":1: no 'def name"):
        load_mbpp_jsonl(path)
