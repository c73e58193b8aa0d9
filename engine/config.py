"""Configuration: frozen dataclasses, one docstring per field; the CLI is generated from them."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

from engine.errors import UsageError

__all__ = ["BootstrapArgs", "RUN_ONLY", "SAFE_ON_RESUME", "TrainConfig", "config_changes", "load_config_file",
           "run_fields", "validate", "values_from_mapping"]


@dataclass(frozen=True)
class TrainConfig:
    """Improve a policy by tree search and preference learning, iteration after iteration."""

    env: Literal["math", "code"] = "math"
    """Environment to train on (code: DSTC-style, completions run in the sandbox)."""
    model: str | None = None
    """Local transformers model directory; the embedded default model when omitted."""
    iterations: int = 3
    """Search → train → evaluate iterations."""
    seed: int = 0
    """Seed for tasks, sampling and training order (and the default model's bootstrap)."""
    name: str | None = None
    """Run name (a directory under --runs-dir); default: <env>-<timestamp>."""
    runs_dir: str = "runs"
    """Directory that holds run directories."""
    task_file: str | None = None
    """Tasks for training and evaluation: GSM8K or MATH JSONL (math); "humaneval" or MBPP JSONL (code).
    Default: generated arithmetic / generated one-line functions."""
    code_pairs: Literal["dstc", "ground-truth", "auto"] = "dstc"
    """Code pairs: DSTC minimax over the model's own tests, the task's tests, or those when it has any."""
    config: str | None = None
    """YAML or JSON file of options, keyed by the names below (``beta: 0.02``, dashes or underscores);
    flags given as well override the file. A run's own config.json works too."""
    resume: str | None = None
    """Continue the run in this directory from its last completed stage (search, extract, train,
    eval) with the same results as an uninterrupted run. Other flags must match the run's config."""
    allow_config_change: bool = False
    """With --resume: accept changes to the options that are safe to change mid-run (iterations,
    threads, device); any other change is refused."""

    # search
    search: Literal["mcts", "tot-bfs", "tot-dfs", "sample"] = "mcts"
    """Search algorithm: MCTS, Tree-of-Thoughts breadth-first (beam) or depth-first (pruned), or
    plain sampling of whole solutions (the instance-level baseline)."""
    leaf_eval: Literal["rollout", "outcome", "self-eval", "scorer", "mix"] = "rollout"
    """How open nodes are valued: policy rollouts to the end, none (terminal outcome only, MCTS),
    the policy's self-evaluation (MCTS-DPO), an external scorer (--scorer), or mix (Agent Q): rollout
    values for the search, plus a critic's score of every step (--scorer if given, else
    self-evaluation) that pairs and lists rank siblings by as alpha * Q + (1 - alpha) * critic."""
    scorer: str | None = None
    """Scorer of partial solutions for --leaf-eval scorer, or the critic of --leaf-eval mix (a process
    reward or value model): MODULE:FUNCTION importable from the working directory, or FILE.py:FUNCTION.
    Called with two lists of strings, the task prompts and the partial solutions (one of each per
    node), it returns one finite number per node."""
    tasks_per_iteration: int = 1024
    """Training tasks searched per iteration (fresh ones each iteration)."""
    simulations: int = 8
    """Search budget per task: MCTS simulations, ToT-DFS expansions, or solutions sampled."""
    rule: Literal["puct", "uct"] = "puct"
    """MCTS selection rule: PUCT (AlphaZero, MCTS-DPO) or UCT (Agent Q)."""
    backup: Literal["mean", "visit-weighted", "max"] = "mean"
    """MCTS backup: running mean, MCTS-DPO's visit-weighted mean of children, or the largest value
    backed up through a node (llm-reasoners' max Q)."""
    gamma: float = 1.0
    """MCTS discount: a node's Q is its step's reward plus gamma times the value of what follows
    (1: undiscounted; below 1 a reward counts for less the more steps it lies ahead, so shorter
    solutions rank higher)."""
    normalize_q: bool = False
    """MCTS selection on Q min-max normalised over each tree's visited nodes (MuZero, mctx), for
    values outside [0, 1] (an external scorer's, say)."""
    leaves_per_tree: int = 1
    """Leaves expanded per tree and round (virtual loss keeps them apart)."""
    commit_every: int = 0
    """MCTS step by step (MCTS-DPO): every N simulations each tree commits to the most visited child
    of its search root and searches on below it, keeping that subtree's statistics (0: one search
    from the root)."""
    beam_width: int = 4
    """Open nodes kept per level in tot-bfs."""
    prune_below: float = 0.3
    """tot-dfs does not explore children valued below this."""
    alpha: float = 0.5
    """--leaf-eval mix: weight of the search's Q against the critic's score when siblings are ranked
    for pairs and lists (Agent Q's alpha)."""
    self_eval_question: str = "\nIs the solution above correct so far? Answer:"
    """Text appended to the partial solution for --leaf-eval self-eval."""
    self_eval_yes: str = " Yes"
    """Positive verdict: the self-evaluation value is its probability, normalised over the two verdicts."""
    self_eval_no: str = " No"
    """Negative verdict."""
    num_candidates: int = 4
    """Next steps sampled per expanded node (K)."""
    c_puct: float = 1.0
    """PUCT exploration constant."""
    temperature: float = 1.0
    """Sampling temperature for expansions and rollouts."""
    rollouts: int = 1
    """Policy rollouts to the end per new open node (its value is their mean reward). The first is
    the rest of the sample that proposed the node's step (one policy call per round proposes the
    steps and rolls them out); any others are sampled from the node."""
    max_depth: int = 12
    """Deepest node (steps from the root) that is still expanded."""
    step_max_tokens: int = 32
    """Token cap for one step (with rollout values, a longer first line is not a step)."""
    min_q_gap: float = 0.5
    """Smallest Q difference between best and worst sibling that yields a pair."""

    # training
    trainer: Literal["dpo", "step-dpo", "tpo"] = "dpo"
    """Preference trainer: DPO on every step pair the search yields; step-DPO on the pairs whose
    rejected step is a first error (no rollout through it succeeded, Q = 0); TPO on sibling lists
    ranked by Q (listwise LiPO-lambda loss with adaptive step rewards). All add the NLL term."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """Preference loss: DPO (sigmoid), IPO, hinge (SLiC) or robust DPO."""
    label_smoothing: float = 0.0
    """Label-flip rate for sigmoid (conservative DPO) and robust; must be in [0, 0.5)."""
    beta: float = 0.01
    """DPO beta (strength of the preference term; larger values hurt the tiny default, see README)."""
    lr: float = 1e-4
    """Learning rate for preference training."""
    epochs: int = 2
    """Epochs over each iteration's pairs."""
    batch_size: int = 16
    """Pairs per optimiser step."""
    sft_weight: float = 1.0
    """Weight of the NLL term (RPO) on verified-correct solutions found by the search; 0: plain DPO."""
    sft_per_task: int = 2
    """Most distinct correct solutions per task in the NLL term."""
    lora: bool = False
    """Train LoRA adapters (peft) and merge them after each iteration, instead of all weights."""
    lora_r: int = 8
    """LoRA rank (with --lora)."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names that get LoRA adapters (with --lora)."""

    # evaluation and hardware
    heldout_size: int = 500
    """Held-out problems evaluated greedily after every iteration (and before the first)."""
    max_new_tokens: int = 96
    """Token cap for a whole solution (rollouts and evaluation)."""
    device: str = "cpu"
    """Torch device for the policy (cpu, cuda, cuda:1, ...)."""
    threads: int = 0
    """CPU threads for torch (0: all cores)."""
    prefix_cache_mb: int = 1024
    """Memory (MiB, on the policy's device) for the keys and values of the contexts a search has
    generated, so that expanding a node skips the prompt pass over its context; 0: none."""
    park_rows: int = 0
    """MCTS with one rollout per node and the prefix cache: an expansion call returns once at most
    this many of its rows still run, all past their first line; those rollouts go on as rows of
    the next round's call and their nodes are valued when they end, a round or more late (0, the
    default: each round waits for its slowest rollout, and every node is valued in the round that
    made it)."""


@dataclass(frozen=True)
class BootstrapArgs:
    """Build (or find in the cache) the embedded default model and report its accuracy."""

    seed: int = 0
    """Seed of the default model."""
    heldout_size: int = 500
    """Held-out problems to report accuracy on."""


RUN_ONLY = ("config", "resume", "allow_config_change")
"""Options about this invocation, not part of a run's configuration."""
SAFE_ON_RESUME = ("iterations", "threads", "device")
"""Options a resumed run may change (with --allow-config-change)."""
_IGNORED_KEYS = ("format", "model_dir", "sandbox")  # written into a run's config.json beside the options


def run_fields(cfg: TrainConfig) -> dict:
    """The options that define a run (what config.json stores)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the files and directories it names (``--model``, ``--task-file``, the file of
    ``--scorer FILE.py:FUNCTION``) made absolute when they exist, so that a run's config.json names
    the same files wherever the run is resumed from. Anything else (``humaneval``, a
    ``MODULE:FUNCTION`` scorer, a path that does not exist, which validation reports) is left as
    given."""

    def absolute(path: str | None) -> str | None:
        if not path or not Path(path).expanduser().exists():
            return path
        return str(Path(path).expanduser().resolve())

    changes = {"model": absolute(cfg.model),
               "task_file": cfg.task_file if cfg.task_file == "humaneval" else absolute(cfg.task_file)}
    if cfg.scorer:
        where, sep, name = cfg.scorer.rpartition(":")
        if sep and where.endswith(".py"):
            changes["scorer"] = f"{absolute(where)}:{name}"
    return dataclasses.replace(cfg, **changes)


def config_changes(saved: TrainConfig, new: TrainConfig) -> dict[str, tuple]:
    """``{field: (saved value, new value)}`` for the run options that differ (name and runs_dir,
    which only locate the run, excluded)."""
    a, b = run_fields(saved), run_fields(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in ("name", "runs_dir")}


def _describe(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is tuple:
        return "a list of strings" if get_args(tp)[0] is str else f"a list of ({_describe(get_args(tp)[0])})"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(tp, str(tp))


def _matches(value, tp) -> bool:
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(tp))
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, get_args(tp)[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def values_from_mapping(data, *, source: str) -> dict:
    """Validated option values from a mapping (a config file, a run's config.json). Every unknown
    key and every value of the wrong type is reported at once, in one :class:`UsageError`."""
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of option names to values, got {type(data).__name__}")
    hints = get_type_hints(TrainConfig)
    known = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUN_ONLY]
    problems, values = [], {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in _IGNORED_KEYS:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
            problems.append(f"{source}: unknown option {raw_key!r}{hint}")
        elif not _matches(value, hints[key]):
            problems.append(f"{source}: {raw_key} must be {_describe(hints[key])}, got {value!r}")
        else:
            values[key] = (float(value) if hints[key] is float else
                           tuple(value) if get_origin(hints[key]) is tuple else value)
    if problems:
        raise UsageError("\n".join(problems))
    return values


def load_config_file(path: str) -> dict:
    """Option values from a YAML (``.yaml``/``.yml``) or JSON file, validated."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file; give a YAML or JSON file of options")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path}: cannot be read ({exc})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError
        kind = "YAML" if p.suffix.lower() in (".yaml", ".yml") else "JSON"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--config {path}: not valid {kind} ({first})") from None
    return values_from_mapping({} if data is None else data, source=f"--config {path}")


_POSITIVE_INT = ("iterations", "tasks_per_iteration", "simulations", "num_candidates", "rollouts",
                 "sft_per_task", "leaves_per_tree", "beam_width", "max_depth", "step_max_tokens", "epochs",
                 "batch_size", "heldout_size", "max_new_tokens", "lora_r")
_POSITIVE_FLOAT = ("beta", "lr")
_NON_NEGATIVE_FLOAT = ("c_puct", "temperature", "sft_weight", "min_q_gap", "prune_below")


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with ``cfg``, each as one line naming the flag and what is expected."""
    problems = []
    for name in _POSITIVE_INT:
        v = getattr(cfg, name)
        if v < 1:
            problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    for name in _POSITIVE_FLOAT:
        v = getattr(cfg, name)
        if not v > 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0, got {v}")
    for name in _NON_NEGATIVE_FLOAT:
        v = getattr(cfg, name)
        if not v >= 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if not 0.0 <= cfg.alpha <= 1.0:
        problems.append(f"--alpha must be in [0, 1], got {cfg.alpha}")
    if not 0.0 <= cfg.gamma <= 1.0:
        problems.append(f"--gamma must be in [0, 1], got {cfg.gamma}")
    elif cfg.gamma != 1.0 and (cfg.search != "mcts" or cfg.env == "code"):
        problems.append("--gamma discounts the returns of MCTS: it needs --search mcts and --env math")
    if cfg.leaf_eval == "scorer" and not cfg.scorer:
        problems.append("--leaf-eval scorer needs --scorer MODULE:FUNCTION (or FILE.py:FUNCTION)")
    if cfg.scorer and cfg.leaf_eval not in ("scorer", "mix"):
        problems.append(f"--scorer is read by --leaf-eval scorer or mix, not {cfg.leaf_eval}; "
                        "drop --scorer or choose one of those")
    if cfg.leaf_eval == "outcome" and cfg.search in ("tot-bfs", "tot-dfs"):
        problems.append("--leaf-eval outcome needs --search mcts (tree-of-thoughts ranks nodes by value)")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        problems.append(f"--label-smoothing must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.threads < 0:
        problems.append(f"--threads must be >= 0, got {cfg.threads}")
    if cfg.prefix_cache_mb < 0:
        problems.append(f"--prefix-cache-mb must be >= 0, got {cfg.prefix_cache_mb}")
    if cfg.commit_every < 0:
        problems.append(f"--commit-every must be >= 0 (0: no commits), got {cfg.commit_every}")
    elif cfg.commit_every and cfg.search != "mcts":
        problems.append("--commit-every commits MCTS steps: it needs --search mcts")
    if cfg.park_rows < 0:
        problems.append(f"--park-rows must be >= 0, got {cfg.park_rows}")
    elif cfg.park_rows and not (cfg.search == "mcts" and cfg.leaf_eval == "rollout" and cfg.rollouts == 1
                                and cfg.prefix_cache_mb > 0):
        problems.append("--park-rows parks MCTS rollouts: it needs --search mcts, --leaf-eval rollout, --rollouts 1 "
                        "and the prefix cache (--prefix-cache-mb > 0); drop it or set those")
    if cfg.env == "code" and (cfg.scorer or cfg.commit_every):
        problems.append("--scorer and --commit-every steer the tree search of --env math; --env code samples whole "
                        "completions (DSTC pairs): drop them")
    if cfg.env == "code" and cfg.trainer == "tpo":
        problems.append("--trainer tpo needs ranked lists from a search tree; use it with --env math")
    if cfg.allow_config_change and cfg.resume is None:
        problems.append("--allow-config-change only applies with --resume RUN_DIR")
    if cfg.name is not None and (not cfg.name or "/" in cfg.name or cfg.name.startswith(".")):
        problems.append(f"--name {cfg.name!r} must be a plain directory name (no '/', not starting with '.')")
    return problems

