"""``engine``: the command line, generated from the config dataclasses by tyro.

    engine train --env math [--config FILE] [--model DIR] [--iterations N] [--seed S] [--name NAME]
    engine train --resume runs/NAME [--allow-config-change --iterations N]
    engine bootstrap [--seed S]
    engine show runs/NAME [--iteration N] [--task ID] [--depth D] [--children K]
    engine view runs/NAME [--host 127.0.0.1] [--port 8765]

Option values come from the defaults, then ``--config FILE`` (or, with ``--resume``, the run's own
config.json), then the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from engine.config import (
    SAFE_ON_RESUME,
    BootstrapArgs,
    TrainConfig,
    absolute_paths,
    config_changes,
    load_config_file,
    validate,
)
from engine.errors import UsageError

__all__ = ["main"]


def _fail(message: str) -> int:
    """One unwrapped ``error:`` line per problem on stderr; exit code 2."""
    for line in str(message).splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr, flush=True)
    return 2


def _bootstrap(args: BootstrapArgs, console) -> int:
    from engine.evaluate import evaluate
    from engine.run_inputs import load_policy
    from engine.tiny_model import BootstrapConfig, bootstrap
    from envs import heldout_arithmetic_tasks

    if args.heldout_size < 1:
        return _fail(f"--heldout-size must be a positive integer, got {args.heldout_size}")
    path = bootstrap(BootstrapConfig(seed=args.seed), log=console.print)
    policy = load_policy(path, "cpu")
    with console.status(f"evaluating {args.heldout_size} held-out problems (greedy)"):
        ev = evaluate(policy, heldout_arithmetic_tasks(args.heldout_size), max_new_tokens=96)
    levels = "  ".join(f"L{k}: {v:.1%}" for k, v in ev["heldout_by_level"].items())
    console.print(f"default model at {path}\nheld-out greedy accuracy {ev['heldout_accuracy']:.1%} ({levels})")
    return 0


def _train_config(argv: list[str]) -> tuple[TrainConfig, TrainConfig | None]:
    """(the configuration to run, the saved one when resuming). Layers: defaults, then the config
    file or the resumed run's config.json, then the flags."""
    import tyro

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    base = saved = None
    if known.resume is not None:
        from engine.run_inputs import load_run_config

        base = saved = load_run_config(known.resume)
    if known.config is not None:
        values = load_config_file(known.config)
        base = dataclasses.replace(base or TrainConfig(), **values)
    cfg = tyro.cli(TrainConfig, default=base or TrainConfig(), args=argv, prog="engine train",
                   description=TrainConfig.__doc__)
    # paths made absolute (a run saved with relative ones reads them from this directory, as before)
    return absolute_paths(cfg), saved and absolute_paths(saved)


def _check_resume(saved: TrainConfig, cfg: TrainConfig) -> None:
    changes = config_changes(saved, cfg)
    if not changes:
        return
    listed = "; ".join(f"{k.replace('_', '-')}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    unsafe = [k for k in changes if k not in SAFE_ON_RESUME]
    if unsafe:
        raise UsageError(f"--resume {cfg.resume}: the configuration differs from the run's ({listed}); "
                         f"{', '.join('--' + k.replace('_', '-') for k in unsafe)} cannot change within a run. "
                         "Drop those flags, or start a new run (--config <run>/config.json with the new values)")
    if not cfg.allow_config_change:
        raise UsageError(f"--resume {cfg.resume}: the configuration differs from the run's ({listed}); "
                         "pass --allow-config-change to accept (safe to change mid-run: "
                         f"{', '.join(SAFE_ON_RESUME)})")


def main(argv: list[str] | None = None) -> int:
    import tyro
    from rich.console import Console

    console = Console(stderr=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "train":
            cfg, saved = _train_config(argv[1:])
            problems = validate(cfg)
            if problems:
                return _fail("\n".join(problems))
            if saved is not None:
                _check_resume(saved, cfg)
            from engine.loop import train

            train(cfg, console)
            return 0
        from engine.show import ShowArgs, show
        from engine.view import ViewArgs, view

        args = tyro.extras.subcommand_cli_from_dict(
            {"train": TrainConfig, "bootstrap": BootstrapArgs, "show": ShowArgs, "view": ViewArgs},
            prog="engine",
            description="Tree-search preference training for language-model reasoning.",
            args=argv,
        )
        if isinstance(args, BootstrapArgs):
            return _bootstrap(args, console)
        if isinstance(args, ShowArgs):
            return show(args, console)
        if isinstance(args, ViewArgs):
            return view(args, console)
        return _fail("use `engine train ...`")
    except UsageError as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
