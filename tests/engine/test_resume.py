"""Runs never lose work: SIGKILL inside every stage then --resume gives the uninterrupted run's
records and metrics; every error path exits 2 and leaves the run directory as it was."""

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUDGET = ["--iterations", "2", "--tasks-per-iteration", "8", "--simulations", "3", "--heldout-size", "24",
          "--num-candidates", "3", "--max-new-tokens", "48", "--threads", "1", "--seed", "7", "--epochs", "1"]
SCHEDULE = ["0/eval", "1/search", "1/extract", "1/train", "1/eval", "2/search", "2/extract", "2/train", "2/eval"]
KILL_POINTS = ["0/eval", "1/search", "1/extract", "1/train", "2/search", "2/eval"]  # every kind of stage; 2/search
# and 2/eval start from a checkpoint read back from disk
TIMING = ("search_s", "train_s", "eval_s", "wall_s")


def engine(*args, kill_at=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ENGINE_KILL_AT", None)
    if kill_at:
        env["ENGINE_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "engine.cli", "train", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def snapshot(run: Path) -> dict[str, str]:
    """Every file under ``run`` (hidden ones too) with the sha256 of its bytes."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def records(run: Path) -> dict[str, object]:
    """What a run produced, timings left out: every record file, model weights and metrics."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if p.name in ("metrics.jsonl", "state.json", "config.json", "summary.json", "curves.png") or p.is_dir():
            continue
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    out["metrics"] = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                      for line in (run / "metrics.jsonl").read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained_model_dir):
    """The quick test model fine-tuned to solve about half of this run's own tasks (held-out and
    training), so that search finds pairs and correct solutions and the train stage really trains."""
    import torch

    from engine.run_inputs import load_policy
    from engine.tiny_model import CHARS, sft_batch
    from envs import arithmetic_tasks, heldout_arithmetic_tasks

    policy = load_policy(trained_model_dir, "cpu")
    model, tok = policy.model, policy.tokenizer
    held = heldout_arithmetic_tasks(24)
    stream = arithmetic_tasks(8, exclude=frozenset(t["prompt"] for t in held))  # --seed 7's training stream
    tasks = held + [next(stream) for _ in range(16)]
    ids, mask, lab = sft_batch([(t["prompt"], t["solution"]) for t in tasks],
                               {c: tok.convert_tokens_to_ids(c) for c in CHARS}, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("memorised") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir):
    """An uninterrupted run."""
    runs = tmp_path_factory.mktemp("ref")
    out = engine("--model", str(model_dir), "--runs-dir", str(runs), "--name", "ref", *BUDGET)
    assert out.returncode == 0, out.stdout + out.stderr
    return runs / "ref"


def test_sigkill_in_every_stage_then_resume_equals_uninterrupted(tmp_path, reference, model_dir):
    run = tmp_path / "k"
    first = engine("--model", str(model_dir), "--runs-dir", str(tmp_path), "--name", "k", *BUDGET,
                   kill_at=KILL_POINTS[0])
    outs = [first]
    for i, point in enumerate(KILL_POINTS):
        out = outs[-1]
        assert out.returncode == -signal.SIGKILL, (point, out.stdout + out.stderr)
        state = json.loads((run / "state.json").read_text())
        assert state["running"] == point and point not in state["done"], (point, state["done"])
        assert state["done"] == SCHEDULE[: SCHEDULE.index(point)]  # every stage before it, no more
        nxt = KILL_POINTS[i + 1] if i + 1 < len(KILL_POINTS) else None
        outs.append(engine("--resume", str(run), kill_at=nxt))
    assert outs[-1].returncode == 0, outs[-1].stdout + outs[-1].stderr
    assert "resuming" in outs[-1].stdout
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    got, want = records(run), records(reference)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key
    assert [r["iteration"] for r in got["metrics"]] == [0, 1, 2]
    assert all(r["num_pairs"] > 0 and r["num_sft"] > 0 for r in got["metrics"][1:])  # real training happened
    # A finished run resumes to nothing left to do.
    again = engine("--resume", str(run))
    assert again.returncode == 0 and "nothing left to do" in again.stdout


def copy_run(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    return run


def assert_refused(out, run: Path, before: dict, needle: str) -> None:
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr, out.stderr
    assert out.stderr.startswith("error: ")
    assert snapshot(run) == before


def test_changed_config_is_refused_listing_the_fields(tmp_path, reference):
    run = copy_run(reference, tmp_path)
    before = snapshot(run)
    out = engine("--resume", str(run), "--beta", "0.5", "--simulations", "9")
    assert_refused(out, run, before, "beta: 0.01 -> 0.5")
    assert "simulations: 3 -> 9" in out.stderr and "cannot change within a run" in out.stderr
    out = engine("--resume", str(run), "--iterations", "3")
    assert_refused(out, run, before, "iterations: 2 -> 3")
    assert "--allow-config-change" in out.stderr


def test_safe_change_extends_a_finished_run(tmp_path, reference):
    run = copy_run(reference, tmp_path)
    out = engine("--resume", str(run), "--iterations", "3", "--allow-config-change")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert json.loads((run / "config.json").read_text())["iterations"] == 3
    assert records(reference)["metrics"] == [{k: v for k, v in r.items() if k not in TIMING} for r in rows[:3]]


def test_corrupt_checkpoint_is_refused(tmp_path, reference):
    run = copy_run(reference, tmp_path)
    weights = run / "iter_002" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(run)
    out = engine("--resume", str(run), "--iterations", "3", "--allow-config-change")
    assert_refused(out, run, before, "model.safetensors is corrupt or truncated")


def test_corrupt_state_file_is_refused(tmp_path, reference):
    run = copy_run(reference, tmp_path)
    state = run / "state.json"
    state.write_text(state.read_text()[:40])
    before = snapshot(run)
    assert_refused(engine("--resume", str(run)), run, before, "state.json is corrupt or truncated")


def test_incompatible_run_format_is_refused(tmp_path, reference):
    run = copy_run(reference, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "format": 1}))
    before = snapshot(run)
    assert_refused(engine("--resume", str(run)), run, before, "incompatible version of the engine")


def test_not_a_run_directory(tmp_path):
    (tmp_path / "x").mkdir()
    out = engine("--resume", str(tmp_path / "x"))
    assert out.returncode == 2 and "not a run directory" in out.stderr
    out = engine("--resume", str(tmp_path / "missing"))
    assert out.returncode == 2 and "no such run directory" in out.stderr


def test_second_writer_is_locked_out(tmp_path, reference):
    run = copy_run(reference, tmp_path)
    before = snapshot(run)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # this test process is "the other writer"
        out = engine("--resume", str(run), "--iterations", "3", "--allow-config-change")
        assert_refused(out, run, before, f"is in use by process {os.getpid()}")
    finally:
        os.close(fd)


DISK_FULL = r"""
set -u
mount -t tmpfs -o size=16m tmpfs "$MNT"
cp -a "$SRC" "$MNT/run"
python_snap() { "$PY" -c "import sys, json; sys.path.insert(0, '$TESTS'); from test_resume import snapshot; \
from pathlib import Path; print(json.dumps(snapshot(Path('$MNT/run'))))"; }
dd if=/dev/zero of="$MNT/fill" bs=64k 2>/dev/null
python_snap > "$OUT/before_full.json"
"$PY" -m engine.cli train --resume "$MNT/run" > "$OUT/full.out" 2> "$OUT/full.err"; echo $? > "$OUT/full.rc"
python_snap > "$OUT/after_full.json"
rm "$MNT/fill"
free=$(df --output=avail -B1 "$MNT" | tail -1)
dd if=/dev/zero of="$MNT/fill" bs=4096 count=$(( (free - 96 * 1024) / 4096 )) 2>/dev/null
"$PY" -m engine.cli train --resume "$MNT/run" > "$OUT/part.out" 2> "$OUT/part.err"; echo $? > "$OUT/part.rc"
ls -a "$MNT/run" "$MNT/run/iter_001" > "$OUT/part.ls"
cp "$MNT/run/state.json" "$OUT/part_state.json"
rm "$MNT/fill"
"$PY" -m engine.cli train --resume "$MNT/run" > "$OUT/done.out" 2> "$OUT/done.err"; echo $? > "$OUT/done.rc"
cp -a "$MNT/run" "$OUT/final"
"""


def test_disk_full_is_reported_and_loses_nothing(tmp_path, reference, model_dir):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a small tmpfs (CI runs as root)")
    src = tmp_path / "src"
    killed = engine("--model", str(model_dir), "--runs-dir", str(src), "--name", "r", *BUDGET,
                    kill_at="1/train")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MNT": str(mnt), "SRC": str(src / "r"), "OUT": str(out),
           "PY": sys.executable, "TESTS": str(Path(__file__).parent)}
    env.pop("ENGINE_KILL_AT", None)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", DISK_FULL], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Completely full: refused at the first write, directory byte-for-byte unchanged.
    assert (out / "full.rc").read_text().strip() == "2", (out / "full.err").read_text()
    assert "disk full" in (out / "full.err").read_text() and "--resume" in (out / "full.err").read_text()
    assert json.loads((out / "before_full.json").read_text()) == json.loads((out / "after_full.json").read_text())
    # Room for small files but not the checkpoint: the train stage fails cleanly, nothing partial kept.
    assert (out / "part.rc").read_text().strip() == "2", (out / "part.out").read_text() + (out / "part.err").read_text()
    assert "disk full" in (out / "part.err").read_text()
    listing = (out / "part.ls").read_text()
    assert ".tmp" not in listing and "model" not in listing.split("iter_001:")[1]
    state = json.loads((out / "part_state.json").read_text())
    assert "1/train" not in state["done"] and "1/extract" in state["done"]
    # Space freed: the run completes with the uninterrupted run's records.
    assert (out / "done.rc").read_text().strip() == "0", (out / "done.err").read_text()
    got, want = records(out / "final"), records(reference)
    assert got == want
