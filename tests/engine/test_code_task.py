"""`engine train --env code` end to end on a briefly trained code model, and the code bootstrap."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.code_task import CodeBootstrapConfig, bootstrap_code


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)

QUICK = dict(max_steps=20, eval_every=10, quick_eval_size=4, batch_size=8, target_pass=1.1, hidden_size=64,
             num_layers=2, num_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def code_model_dir(tmp_path_factory):
    """A real (short) code bootstrap: the same code path as the default code model."""
    return bootstrap_code(CodeBootstrapConfig(**QUICK), cache_dir=tmp_path_factory.mktemp("code-boot"),
                          log=lambda s: None)


def test_code_bootstrap_is_cached_and_loadable(code_model_dir, tmp_path):
    summary = json.loads((code_model_dir / "bootstrap.json").read_text())
    assert summary["steps"] == 20 and len(summary["history"]) == 2
    assert bootstrap_code(CodeBootstrapConfig(**QUICK), cache_dir=code_model_dir.parent,
                          log=lambda s: None) == code_model_dir


SMOKE = ["--iterations", "1", "--tasks-per-iteration", "8", "--simulations", "4", "--heldout-size", "16",
         "--epochs", "1", "--threads", "2"]


@pytest.fixture(scope="module")
def code_run(tmp_path_factory, code_model_dir):
    runs = tmp_path_factory.mktemp("code-runs")
    out = run_cli("train", "--env", "code", "--model", str(code_model_dir), "--runs-dir", str(runs),
                  "--name", "code", *SMOKE)
    assert out.returncode == 0, out.stdout + out.stderr
    return runs / "code", out


def test_train_code_smoke(code_run):
    run, out = code_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert 0.0 <= r["heldout_pass@1"] <= 1.0 and set(r["heldout_by_level"]) <= {"int1", "int2", "list", "str"}
    config = json.loads((run / "config.json").read_text())
    assert config["env"] == "code" and config["sandbox"]["isolation"]
    for line in (run / "iter_001" / "pairs.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["source"] == "dstc" and rec["chosen_q"] > rec["rejected_q"] and rec["chosen"].endswith("# end\n")
    assert (run / "iter_001" / "model" / "config.json").is_file()
    assert "held-out pass@1" in out.stdout


def test_code_task_file_errors_exit_2(tmp_path):
    bad = tmp_path / "mbpp.jsonl"
    bad.write_text('{"text": "x", "code": "def f(): pass", "test_list": []}\n')
    out = run_cli("train", "--env", "code", "--task-file", str(bad), "--runs-dir", str(tmp_path / "runs"))
    assert out.returncode == 2 and "mbpp.jsonl:1" in out.stderr and not (tmp_path / "runs").exists()


def test_code_run_killed_in_each_stage_resumes_to_the_same_records(tmp_path, code_run, code_model_dir):
    from test_resume import records

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "engine.cli", "train"]
    first = [*cmd, "--env", "code", "--model", str(code_model_dir), "--runs-dir", str(tmp_path), "--name", "k",
             *SMOKE]
    for args, kill in [(first, "1/search"), ([*cmd, "--resume", str(tmp_path / "k")], "1/extract"),
                       ([*cmd, "--resume", str(tmp_path / "k")], "1/train")]:
        out = subprocess.run(args, capture_output=True, text=True, env={**env, "ENGINE_KILL_AT": kill}, timeout=600)
        assert out.returncode == -9, out.stdout + out.stderr
        assert json.loads((tmp_path / "k" / "state.json").read_text())["running"] == kill
    out = subprocess.run([*cmd, "--resume", str(tmp_path / "k")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert records(tmp_path / "k") == records(code_run[0])
