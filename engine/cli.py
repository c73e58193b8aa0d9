"""``engine``: the command line, generated from the config dataclasses by tyro.

    engine train --env math [--model DIR] [--iterations N] [--seed S] [--name NAME] [--runs-dir DIR]
    engine bootstrap [--seed S]
"""

from __future__ import annotations

import sys

from engine.config import BootstrapArgs, TrainConfig, validate
from engine.errors import UsageError

__all__ = ["main"]


def _fail(message: str) -> int:
    """One unwrapped line on stderr; exit code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def _bootstrap(args: BootstrapArgs, console) -> int:
    from engine.evaluate import evaluate
    from engine.loop import load_policy
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


def main(argv: list[str] | None = None) -> int:
    import tyro
    from rich.console import Console

    console = Console(stderr=False)
    args = tyro.extras.subcommand_cli_from_dict(
        {"train": TrainConfig, "bootstrap": BootstrapArgs},
        prog="engine",
        description="Tree-search preference training for language-model reasoning.",
        args=sys.argv[1:] if argv is None else argv,
    )
    try:
        if isinstance(args, BootstrapArgs):
            return _bootstrap(args, console)
        problems = validate(args)
        if problems:
            for p in problems:
                _fail(p)
            return 2
        from engine.loop import train

        train(args, console)
        return 0
    except UsageError as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
