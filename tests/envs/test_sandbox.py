"""The sandbox on ordinary code: verdicts per test, timeouts, load errors, values across the proxy, the
cache and the pool; and every HumanEval canonical solution (passes) and a broken variant of each (fails)."""

import os

import pytest

from envs.sandbox import Job, Sandbox, SandboxLimits, sandbox_processes

LIMITS = SandboxLimits(timeout_s=6, test_timeout_s=2, cpu_s=3)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(limits=LIMITS, workers=2) as sb:
        yield sb


def test_mechanism_is_stated_and_strongest_as_root(sandbox):
    d = sandbox.describe()
    assert d["isolation"] in ("namespaces", "user-namespaces", "process-group")
    assert d["environment"] == "empty" and d["interpreter"]
    if os.geteuid() == 0:  # CI runs as root: the full mechanism must be in force there
        assert d["isolation"] == "namespaces"
        assert {"pid", "net", "mount"} <= set(d["namespaces"])
        assert d["cgroup"] and "pids" in d["cgroup"] and "memory" in d["cgroup"]
        assert sandbox.uids() and all(u != 0 for u in sandbox.uids())


def test_per_test_verdicts(sandbox):
    code = "def add(a, b):\n    return a + b\n"
    r = sandbox.run(Job(code, ("assert add(1, 2) == 3", "assert add(1, 2) == 4", "assert add('a', 'b') == 'ab'",
                               "raise ValueError('boom')"), "add"))
    assert r.passed == (True, False, True, False)
    assert r.status == "ok" and r.reasons[0] == "" and "AssertionError" in r.reasons[1]
    assert "ValueError" in r.reasons[3] and r.leftovers == 0


def test_values_cross_the_proxy_exactly(sandbox):
    code = ("def f(x):\n    return [x, (1, 2.5), {'k': {3}}, frozenset([b'z']), None, True, 1 + 2j, float('inf'),"
            " 10**40]\n")
    test = ("r = f('s')\nassert r == ['s', (1, 2.5), {'k': {3}}, frozenset([b'z']), None, True, 1 + 2j, "
            "float('inf'), 10**40]\nassert type(r[1]) is tuple and type(r[5]) is bool")
    assert sandbox.run(Job(code, (test,), "f")).passed == (True,)


def test_exceptions_keep_their_builtin_type(sandbox):
    code = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    test = "try:\n    f(-1)\n    raise AssertionError('no error')\nexcept ValueError:\n    pass"
    assert sandbox.run(Job(code, (test, "assert f(2) == 2"), "f")).passed == (True, True)


def test_load_errors_fail_every_test(sandbox):
    r = sandbox.run(Job("def f(x):\n    return (\n", ("assert True", "assert True"), "f"))
    assert r.passed == (False, False) and "SyntaxError" in r.reasons[0]
    r = sandbox.run(Job("def g(x):\n    return x\n", ("assert True",), "f"))
    assert r.passed == (False,) and "KeyError" in r.reasons[0]


def test_a_hanging_test_fails_alone(sandbox):
    code = "def f(x):\n    while x == 0:\n        pass\n    return x\n"
    r = sandbox.run(Job(code, ("assert f(1) == 1", "assert f(0) == 0", "assert f(2) == 2"), "f"))
    assert r.passed == (True, False, True)
    assert r.reasons[1] == "timeout" and r.leftovers == 0


def test_context_helpers_come_from_the_task_not_the_candidate(sandbox):
    context = "def helper(x):\n    return x * 10\n\ndef f(x):\n    '''stub'''\n"
    code = "def helper(x):\n    return 0\n\ndef f(x):\n    return 5\n"  # redefines helper to cheat
    r = sandbox.run(Job(code, ("assert helper(f(1)) == 0",), "f", context=context))
    assert r.passed == (False,)


def test_cache_and_pool(sandbox):
    jobs = [Job(f"def f(x):\n    return x * {k}\n", ("assert f(3) == 6",), "f") for k in range(6)]
    first = sandbox.run_many(jobs)
    assert [r.all_passed for r in first] == [k == 2 for k in range(6)]
    hits = sandbox.stats["cache_hits"]
    again = sandbox.run_many(jobs)
    assert [r.passed for r in again] == [r.passed for r in first]
    assert all(r.cached for r in again) and sandbox.stats["cache_hits"] == hits + 6


def test_fallback_mechanism_is_honest():
    sb = Sandbox(limits=LIMITS, workers=1, isolation="process-group")
    d = sb.describe()
    assert d["isolation"] == "process-group" and "escape" in d["kills_whole_tree"]
    assert "not isolated" in d["network"]
    # the environment is empty in every mode (the interpreter itself may set LC_CTYPE, PEP 538)
    r = sb.run(Job("import os\ndef f():\n    return sorted(os.environ)\n", ("assert set(f()) <= {'LC_CTYPE'}",), "f"))
    assert r.passed == (True,)


def test_humaneval_canonical_solutions_pass_and_broken_variants_fail(sandbox, capsys):
    from envs.code_tasks import humaneval_tasks

    tasks = humaneval_tasks()
    assert len(tasks) == 164
    limits = SandboxLimits(timeout_s=20, test_timeout_s=15, cpu_s=15)
    with Sandbox(limits=limits, workers=max(2, os.cpu_count() or 2)) as sb:
        good = sb.run_many([Job(t["prompt"] + t["canonical_solution"], t["tests"], t["entry_point"],
                                context=t["context"]) for t in tasks])
        broken = sb.run_many([Job(t["prompt"] + t["canonical_solution"] + _MUTATE.format(e=t["entry_point"]),
                                  t["tests"], t["entry_point"], context=t["context"]) for t in tasks])
        uids = sb.uids()
    n_good = sum(r.all_passed for r in good)
    n_broken = sum(not r.all_passed for r in broken)
    with capsys.disabled():
        print(f"\nHumanEval through the sandbox: {n_good}/164 canonical solutions pass, "
              f"{n_broken}/164 broken variants fail")
    assert n_good == 164, [(t["task_id"], r.reasons) for t, r in zip(tasks, good) if not r.all_passed]
    assert n_broken == 164, [t["task_id"] for t, r in zip(tasks, broken) if r.all_passed]
    assert sum(r.leftovers for r in good + broken) == 0 and not sandbox_processes(uids)


_MUTATE = '''
_original_{e} = {e}

def _mutate(r):
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float)):
        return r + 1
    if isinstance(r, str):
        return r + "?"
    if isinstance(r, list):
        return r + [None]
    if isinstance(r, tuple):
        return r + (None,)
    return 0 if r is None else None

def {e}(*args, **kwargs):
    return _mutate(_original_{e}(*args, **kwargs))
'''
