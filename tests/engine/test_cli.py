"""The `engine` command: one end-to-end smoke run and every bad-input path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from search import tree_from_dict

ENGINE = [sys.executable, "-m", "engine.cli"]
SMOKE = ["--iterations", "1", "--tasks-per-iteration", "6", "--simulations", "2", "--heldout-size", "12",
         "--num-candidates", "3", "--max-new-tokens", "48", "--threads", "2"]


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([*ENGINE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_train_smoke(tmp_path, trained_model_dir):
    # Options from a YAML file; a flag given as well overrides the file.
    (tmp_path / "run.yaml").write_text("seed: 9\ntasks-per-iteration: 6\nmin_q_gap: 0.5\n")
    out = run_cli("train", "--env", "math", "--model", str(trained_model_dir), "--runs-dir", str(tmp_path),
                  "--name", "smoke", "--config", str(tmp_path / "run.yaml"), *SMOKE, "--seed", "3")
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "smoke"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert {"iteration", "heldout_accuracy", "num_pairs", "wall_s", "heldout_by_level"} <= set(r)
        assert 0.0 <= r["heldout_accuracy"] <= 1.0
    config = json.loads((run / "config.json").read_text())
    assert config["seed"] == 3 and config["tasks_per_iteration"] == 6 and "config" not in config
    it = run / "iter_001"
    trees = json.loads((it / "trees.json").read_text())
    assert len(trees) == 6 and all(t["visits"][0] >= 2 for t in trees)
    for line in (it / "pairs.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["chosen_q"] - rec["rejected_q"] >= 0.5 and rec["iteration"] == 1
    assert (it / "model" / "config.json").is_file() and (it / "model" / "tokenizer.json").is_file()
    assert (run / "curves.png").stat().st_size > 1000
    assert "held-out accuracy" in out.stdout and f"engine show {run}" in " ".join(out.stdout.split())
    # engine show: the iteration's trees in a table, then one tree node by node
    shown = run_cli("show", str(run), "--limit", "3")
    assert shown.returncode == 0, shown.stderr
    assert f"iteration 1: 6 trees, {sum(len(t['texts']) for t in trees)} nodes" in " ".join(shown.stdout.split())
    assert all(f" {t['meta']['task_id']} " in shown.stdout for t in trees[:3]) and "3 more" in shown.stdout
    task = trees[2]["meta"]["task_id"]
    shown = run_cli("show", str(run), "--iteration", "1", "--task", task, "--plot", str(tmp_path / "t.svg"))
    assert shown.returncode == 0, shown.stderr
    assert (tmp_path / "t.svg").read_text().startswith("<?xml") and shown.stdout.endswith(f"wrote {tmp_path}/t.svg\n")
    lines = shown.stdout.splitlines()
    assert lines[1].startswith(f"tree 2 · {task} · {len(trees[2]['texts'])} nodes")
    for bad, needle in [(task[:-1] + "#", "did you mean"), ("6", "iteration 1 has 6 trees (0..5)")]:
        shown = run_cli("show", str(run), "--task", bad)
        assert shown.returncode == 2 and needle in shown.stderr, shown.stderr
    assert len(lines) == 4 + len(trees[2]["texts"]) and lines[3].startswith(f"* N {trees[2]['visits'][0]}  ")


def test_train_tpo_with_lora_writes_lists_and_trainer_metrics(tmp_path, trained_model_dir):
    out = run_cli("train", "--env", "math", "--model", str(trained_model_dir), "--runs-dir", str(tmp_path),
                  "--name", "tpo", "--trainer", "tpo", "--lora", "--lora-targets", "q_proj", "v_proj", *SMOKE)
    assert out.returncode == 0, out.stdout + out.stderr
    it = tmp_path / "tpo" / "iter_001"
    lists = [json.loads(line) for line in (it / "lists.jsonl").read_text().splitlines()]
    assert lists and all(r["scores"] == sorted(r["scores"], reverse=True) for r in lists)
    steps = [json.loads(line) for line in (it / "train_metrics.jsonl").read_text().splitlines()]
    assert steps and {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected"} <= set(steps[0])
    row = json.loads((tmp_path / "tpo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["trainer"] == "tpo" and row["num_train_records"] == len(lists)


def test_train_with_a_scorer_module_as_agent_q_critic_and_step_commits(tmp_path, trained_model_dir):
    (tmp_path / "my_prm.py").write_text("def score(prompts, partials):\n"
                                        "    return [min(len(p), 30) / 30 for p in partials]\n")
    out = run_cli("train", "--env", "math", "--model", str(trained_model_dir), "--runs-dir", str(tmp_path / "runs"),
                  "--name", "critic", "--leaf-eval", "mix", "--scorer", "my_prm:score", "--alpha", "0.25",
                  "--commit-every", "1", "--trainer", "tpo", "--min-q-gap", "0.05", *SMOKE,
                  cwd=tmp_path)  # the scorer is imported from the working directory
    assert out.returncode == 0, out.stdout + out.stderr
    it = tmp_path / "runs" / "critic" / "iter_001"
    trees = [tree_from_dict(t) for t in json.loads((it / "trees.json").read_text())]
    scored = [(t, i) for t in trees for i in np.flatnonzero(~np.isnan(t.critic[0, : t.node_count[0]]))]
    assert scored and all(t.critic[0, i] == min(len(t.prefix_text(0, i)), 30) / 30 for t, i in scored)
    assert all(t.meta[0]["task_id"].startswith("arith") for t in trees)
    pairs = [json.loads(line) for line in (it / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    for rec in pairs:  # ranked by 0.25 * Q + 0.75 * critic, the gap taken on those values
        for side in ("chosen", "rejected"):
            critic = min(len(rec["prefix"] + rec[side]), 30) / 30  # terminal steps (answer lines) scored too
            assert rec[f"{side}_score"] == pytest.approx(0.25 * rec[f"{side}_q"] + 0.75 * critic)
        assert rec["chosen_score"] >= rec["rejected_score"] + 0.05 - 1e-9
    lists = [json.loads(line) for line in (it / "lists.jsonl").read_text().splitlines()]
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in lists)


def test_relative_paths_are_saved_absolute_so_a_run_resumes_from_anywhere(tmp_path, trained_model_dir):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    (start / "prm.py").write_text("def score(prompts, partials):\n    return [0.5 for p in partials]\n")
    model = os.path.relpath(trained_model_dir, start)
    out = run_cli("train", "--env", "math", "--model", model, "--runs-dir", str(tmp_path / "runs"), "--name", "rel",
                  "--leaf-eval", "mix", "--scorer", "prm.py:score", *SMOKE, cwd=start)
    assert out.returncode == 0, out.stdout + out.stderr
    saved = json.loads((tmp_path / "runs" / "rel" / "config.json").read_text())
    assert saved["model"] == str(Path(trained_model_dir).resolve())
    assert saved["scorer"] == f"{(start / 'prm.py').resolve()}:score"
    # the same relative flags from the same directory are no change; from elsewhere the run goes on as saved
    again = run_cli("train", "--resume", str(tmp_path / "runs" / "rel"), "--model", model, "--scorer", "prm.py:score",
                    cwd=start)
    assert again.returncode == 0 and "resuming" in again.stdout, again.stdout + again.stderr
    more = run_cli("train", "--resume", str(tmp_path / "runs" / "rel"), "--allow-config-change", "--iterations", "2",
                   cwd=elsewhere)
    assert more.returncode == 0, more.stdout + more.stderr
    assert (tmp_path / "runs" / "rel" / "iter_002" / "trees.json").exists()


def test_absolute_paths_leave_names_that_are_not_files_as_given(tmp_path, monkeypatch):
    from engine.config import TrainConfig, absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "humaneval").mkdir()  # the keyword, not this directory
    (tmp_path / "prm.py").write_text("")
    cfg = absolute_paths(TrainConfig(env="code", task_file="humaneval", model="", scorer="prm.py:score"))
    assert (cfg.task_file, cfg.model, cfg.scorer) == ("humaneval", "", f"{tmp_path.resolve() / 'prm.py'}:score")
    cfg = absolute_paths(TrainConfig(task_file="missing.jsonl", scorer="prm:score", model="humaneval"))
    assert (cfg.task_file, cfg.scorer) == ("missing.jsonl", "prm:score")
    assert cfg.model == str(tmp_path.resolve() / "humaneval")  # a model directory of that name is one


def test_help_documents_trainer_flags():
    out = run_cli("train", "--help")
    assert out.returncode == 0
    for flag in ("--trainer", "step-dpo", "tpo", "--loss", "--beta", "--lora", "--lora-targets"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--iterations", "0"], "--iterations must be a positive integer"),
        (["--iterations", "-2", "--lr", "0"], "--lr must be > 0"),
        (["--model", "/nonexistent/model"], "not a transformers model directory"),
        (["--task-file", "/nonexistent.jsonl"], "does not exist"),
        (["--name", "../escape"], "plain directory name"),
        (["--search", "tot-bfs", "--leaf-eval", "outcome"], "needs --search mcts"),
        (["--alpha", "2"], "--alpha must be in [0, 1]"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
        (["--search", "tot-bfs", "--gamma", "0.9"], "--gamma discounts the returns of MCTS"),
        (["--env", "code", "--gamma", "0.9"], "needs --search mcts and --env math"),
        (["--leaf-eval", "scorer"], "--leaf-eval scorer needs --scorer"),
        (["--search", "tot-bfs", "--commit-every", "2"], "--commit-every commits MCTS steps"),
        (["--commit-every", "2", "--env", "code"], "--env code samples whole completions"),
        (["--scorer", "prm:score"], "read by --leaf-eval scorer or mix"),
        (["--leaf-eval", "mix", "--scorer", "/nonexistent/prm.py:score"], "no such file"),
        (["--leaf-eval", "scorer", "--scorer", "json:no_such_function"], "json has no function no_such_function"),
        (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
    ],
)
def test_bad_flags_exit_2_and_write_nothing(tmp_path, args, needle):
    runs = tmp_path / "runs"
    out = run_cli("train", "--env", "math", "--runs-dir", str(runs), *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith("error:")]) >= 1
    assert not runs.exists()


def test_unknown_env_exits_2(tmp_path):
    out = run_cli("train", "--env", "chess", "--runs-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "chess" in out.stdout + out.stderr
    assert not (tmp_path / "r").exists()


def test_non_model_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "not-a-model"}')
    out = run_cli("train", "--model", str(tmp_path / "m"), "--runs-dir", str(tmp_path / "r"), *SMOKE)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot be loaded as a causal LM" in out.stderr
    assert not (tmp_path / "r").exists()


def test_unwritable_runs_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = run_cli("train", "--runs-dir", str(blocker / "runs"))
    assert out.returncode == 2 and "not a directory" in out.stderr
    out = run_cli("train", "--runs-dir", "/proc/engine-runs")
    assert out.returncode == 2 and "not writable" in out.stderr


def test_existing_run_name_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    out = run_cli("train", "--runs-dir", str(tmp_path), "--name", "taken")
    assert out.returncode == 2 and "already exists" in out.stderr
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["keep.txt"]


def test_help_documents_every_option_with_its_default():
    import dataclasses

    from engine.config import TrainConfig

    out = run_cli("train", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert text.count("(default:") >= len(dataclasses.fields(TrainConfig))


def test_config_file_problems_are_all_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: high\nlerning-rate: 0.1\nsearch: astar\niterations: 2\n")
    runs = tmp_path / "runs"
    out = run_cli("train", "--config", str(bad), "--runs-dir", str(runs))
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3, out.stderr
    assert "beta must be a number, got 'high'" in out.stderr
    assert "unknown option 'lerning-rate'" in out.stderr
    assert "search must be one of 'mcts', 'tot-bfs', 'tot-dfs', 'sample', got 'astar'" in out.stderr
    assert not runs.exists()
    # Values that parse but are out of range are reported together too, file and flags alike.
    (tmp_path / "c.json").write_text(json.dumps({"iterations": 0, "alpha": 3}))
    out = run_cli("train", "--config", str(tmp_path / "c.json"), "--lr", "-1", "--runs-dir", str(runs))
    assert out.returncode == 2
    assert {"--iterations must be a positive integer, got 0", "--alpha must be in [0, 1], got 3.0",
            "--lr must be > 0, got -1.0"} <= {line[len("error: "):] for line in out.stderr.splitlines()}
    for text, needle in [("{not json", "not valid JSON"), ("[1, 2]", "expected a mapping")]:
        (tmp_path / "x.json").write_text(text)
        out = run_cli("train", "--config", str(tmp_path / "x.json"), "--runs-dir", str(runs))
        assert out.returncode == 2 and needle in out.stderr
    out = run_cli("train", "--config", str(tmp_path / "missing.yaml"), "--runs-dir", str(runs))
    assert out.returncode == 2 and "no such file" in out.stderr
    assert not runs.exists()


def test_show_says_what_a_run_directory_holds(tmp_path, capsys):
    from engine.cli import main
    from engine.show import load_trees

    run = tmp_path / "run"
    trees = run / "iter_001" / "trees.json"
    steps = [  # (what to write where, or None; the arguments after the run; what the error says)
        (None, [], "no such run directory"),
        ((run / "config.json", "{}"), [], "no search trees yet (a run directory)"),
        ((run / "iter_001" / "samples.jsonl", ""), [], "a code run samples completions"),
        ((trees, '[{"texts": [""]}]'), [], "does not hold search trees"),
        ((trees, "[]"), [], "holds no trees (an empty list)"),
        ((trees, '[{"texts": [""'), ["--iteration", "1"], "corrupt or truncated"),
        (None, ["--iteration", "4"], "iteration 4 has no search trees; iterations with trees: 1"),
        (None, ["--children", "0"], "--children must be at least 1"),
        (None, ["--depth", "2"], "--depth: only for the view of one tree; add --task ID"),
        (None, ["--task", "0", "--plot", str(tmp_path / "t.jpg")], "give a file ending in .png, .svg, .pdf"),
        (None, ["--task", "0", "--plot", str(tmp_path / "no" / "t.png")], "create it first"),
    ]
    for write, args, needle in steps:
        if write is not None:
            write[0].parent.mkdir(parents=True, exist_ok=True)
            write[0].write_text(write[1])
        assert main(["show", str(run), *args]) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(Exception, match="corrupt or truncated"):
        load_trees(run)


def test_show_finds_a_task_in_the_iteration_that_searched_it(tmp_path):
    from search import Tree, tree_to_dict

    run = tmp_path / "run"
    for it, task in [(1, "first"), (2, "second"), (3, "third")]:
        tree = Tree(1)
        tree.meta[0] = {"task_id": task, "prompt": "1+1\n"}
        tree.add_children(0, 0, ["#### 2\n"], [1.0], [1.0], [True])
        tree.visits[0, :2], tree.value_sum[0, :2] = 1, 1.0
        (run / f"iter_{it:03d}").mkdir(parents=True)
        (run / f"iter_{it:03d}" / "trees.json").write_text(json.dumps([tree_to_dict(tree, 0)]))
    (run / "iter_0004").mkdir()  # not a name the engine writes: ignored
    (run / "iter_0004" / "trees.json").write_text("[]")
    out = run_cli("show", str(run), "--task", "first")
    assert out.returncode == 2 and "not searched in iteration 3; it was in iteration 1 (--iteration 1)" in out.stderr
    out = run_cli("show", str(run), "--task", "first", "--iteration", "1")
    assert out.returncode == 0 and out.stdout.splitlines()[:2] == ["iteration 1", "tree 0 · first · 2 nodes, depth 1, "
                                                                   "1 simulations"]
    assert out.stdout.splitlines()[-1] == "└─* N 1  Q +1.000  P 1.00  r 1  END  #### 2"
    out = run_cli("show", str(run))
    assert out.returncode == 0 and "iteration 3: 1 trees" in out.stdout and " third " in out.stdout


def test_show_marks_the_pairs_extracted_from_a_tree(tmp_path, capsys):
    from engine.cli import main
    from search import Tree, extract_pairs, tree_to_dict

    tree = Tree(2)
    for b, task in enumerate(["t0", "t1"]):
        tree.meta[b] = {"task_id": task, "prompt": "2+3\n"}
        a, a2, c = tree.add_children(b, 0, ["a\n", "a\n", "c\n"], [0.4, 0.3, 0.3], [0.0] * 3, [False] * 3)
        d, e = tree.add_children(b, a, ["d\n", "e\n"], [0.5, 0.5], [1.0, 0.0], [True, True])
        for node, n, q in [(0, 6, 0.5), (a, 3, 1 / 3), (a2, 1, 1.0), (c, 2, 0.0), (d, 1, 1.0), (e, 2, 0.0)]:
            tree.visits[b, node], tree.value_sum[b, node] = n, n * q
    run = tmp_path / "run"
    (run / "iter_001").mkdir(parents=True)
    (run / "iter_001" / "trees.json").write_text(json.dumps([tree_to_dict(tree, b) for b in range(2)]))
    pairs = extract_pairs(tree, prompts=["2+3\n"] * 2, task_ids=["t0", "t1"], mode="all", min_q_gap=0.5)
    assert len(pairs) == 4  # per tree: a (merged with its repeat, Q 0.5) over c; d over e
    pairs.append({**pairs[-1], "chosen": "not in the tree\n"})  # no mark: not a pair of this tree's nodes
    (run / "iter_001" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs if p["task_id"] == "t1"))
    assert main(["show", str(run), "--task", "t1", "--order", "index"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "iteration 1; ▲k / ▼k: chosen / rejected in k of the 2 pairs extracted from this tree"
    assert lines[4:] == ["├─* N 3  Q +0.333  P 0.40  ▲1  a",
                         "│   ├─  N 1  Q +1.000  P 0.50  r 1  END  ▲1  d",
                         "│   └─* N 2  Q +0.000  P 0.50  END  ▼1  e",
                         "├─  N 1  Q +1.000  P 0.30  a",
                         "└─  N 2  Q +0.000  P 0.30  ▼1  c"]
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "; 3 pairs extracted" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert [r[:2] + r[-2:-1] for r in rows] == [["0", "t0", "0"], ["1", "t1", "3"]]  # pairs.jsonl's records
