"""What a run starts from, checked before anything is written: the run directory's place, the
model, the tasks and, for ``--resume``, the stored configuration."""

from __future__ import annotations

import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
from rich.console import Console

from engine.config import TrainConfig, values_from_mapping
from engine.errors import UsageError
from engine.run_dir import read_json
from envs import TaskFileError, arithmetic_tasks, heldout_arithmetic_tasks, load_tasks

__all__ = ["RUN_FORMAT", "default_model", "iteration_tasks", "load_policy", "load_run_config", "prepare",
           "task_sources"]

RUN_FORMAT = 2
"""Version of the run-directory layout; a run of another format is not resumed."""


def load_policy(model_dir: str | Path, device: str, batch_size: int = 256):
    """Load a local causal LM and its tokenizer; :class:`UsageError` when the directory is not one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engine.policy import TransformersPolicy

    path = Path(model_dir)
    if not path.is_dir():
        raise UsageError(f"--model {model_dir}: no such directory; give a local transformers model "
                         "directory (omit --model to use the embedded default)")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: no config.json there, so it is not a transformers model "
                         "directory; point at the folder written by save_pretrained")
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)  # fails fast on a non-model config
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model {model_dir}: cannot be loaded as a causal LM with its tokenizer "
                         f"({first}); it needs config.json, weights and tokenizer files") from None
    tokenizer.padding_side = "left"
    return TransformersPolicy(model, tokenizer, device=device, batch_size=batch_size)


def prepare(cfg: TrainConfig) -> Path:
    """Check everything that can be checked before anything is written; the run directory path."""
    runs = Path(cfg.runs_dir)
    probe = runs
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--runs-dir {cfg.runs_dir}: {probe} is not a directory; choose another path")
    if not _can_write(probe):
        raise UsageError(f"--runs-dir {cfg.runs_dir}: not writable ({probe} refuses new files); "
                         "choose a directory you can write to")
    name = cfg.name or f"{cfg.env}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = runs / name
    if run.exists():
        raise UsageError(f"run directory {run} already exists; choose another --name "
                         "(or delete the old run if you no longer need it)")
    if cfg.model is not None:
        mp = Path(cfg.model)
        if not mp.is_dir() or not (mp / "config.json").is_file():
            raise UsageError(f"--model {cfg.model}: not a transformers model directory (no config.json); "
                             "give the folder written by save_pretrained, or omit --model")
    if cfg.task_file is not None:
        try:
            if cfg.env == "code":
                from envs import load_code_tasks

                load_code_tasks(cfg.task_file)
            else:
                load_tasks(cfg.task_file)
        except TaskFileError as exc:
            raise UsageError(f"--task-file: {exc}") from None
    if cfg.scorer:
        from engine.scorers import load_scorer

        load_scorer(cfg.scorer)  # a scorer that cannot be imported fails here, not after the first search
    return run


def load_run_config(path: str | os.PathLike) -> TrainConfig:
    """The configuration stored in run directory ``path`` (for ``--resume``); a :class:`UsageError`
    when it is not a run directory or was written by an incompatible version."""
    run = Path(path)
    if not run.is_dir():
        raise UsageError(f"--resume {path}: no such run directory; give a directory under your --runs-dir")
    if not (run / "config.json").is_file():
        raise UsageError(f"--resume {path}: no config.json there, so it is not a run directory")
    data = read_json(run / "config.json")
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != RUN_FORMAT:
        raise UsageError(f"--resume {path}: written by an incompatible version of the engine (run format {fmt!r}; "
                         f"this version reads format {RUN_FORMAT}); resume it with the version that wrote it, "
                         "or start a new run")
    return TrainConfig(**values_from_mapping(data, source=str(run / "config.json")))


def iteration_tasks(cfg: TrainConfig, it: int) -> list[dict]:
    """The training tasks of iteration ``it`` (a fixed slice of the seeded task stream)."""
    _, stream = task_sources(cfg)
    start = (it - 1) * cfg.tasks_per_iteration
    return list(islice(stream, start, start + cfg.tasks_per_iteration))


def _can_write(directory: Path) -> bool:
    """Whether a file can be created in ``directory`` (tried for real: root passes ``os.access``
    checks even where the filesystem refuses)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".engine-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def task_sources(cfg: TrainConfig):
    """(held-out tasks, iterator over training tasks)."""
    if cfg.env == "code":
        from engine.code_task import code_task_sources

        return code_task_sources(cfg)
    if cfg.task_file is None:
        heldout = heldout_arithmetic_tasks(cfg.heldout_size)
        exclude = frozenset(t["prompt"] for t in heldout)
        return heldout, arithmetic_tasks(cfg.seed + 1, exclude=exclude)
    tasks = load_tasks(cfg.task_file)
    order = np.random.default_rng(0).permutation(len(tasks))
    n_held = min(cfg.heldout_size, len(tasks) // 2)
    heldout = [tasks[i] for i in order[:n_held]]
    train = [tasks[i] for i in order[n_held:]]

    def cycle():
        rng = np.random.default_rng(cfg.seed + 1)
        while True:
            for i in rng.permutation(len(train)):
                yield train[i]

    return heldout, cycle()


def default_model(cfg: TrainConfig, console: Console, sandbox) -> str:
    """The embedded default model for ``cfg.env`` (built on first use, then cached)."""
    if cfg.env == "code":
        from engine.code_task import CodeBootstrapConfig, bootstrap_code

        return str(bootstrap_code(CodeBootstrapConfig(seed=cfg.seed), sandbox=sandbox, log=console.print))
    from engine.tiny_model import BootstrapConfig, bootstrap

    return str(bootstrap(BootstrapConfig(seed=cfg.seed), log=console.print))
