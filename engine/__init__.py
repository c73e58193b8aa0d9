"""The engine: configuration and CLI, policies, the embedded default model, search glue, the
iterative loop and the run directory. Heavy modules (torch, transformers) load on first use."""

from importlib import import_module

from engine.config import BootstrapArgs, TrainConfig, validate
from engine.errors import UsageError

__all__ = [
    "BootstrapArgs",
    "BootstrapConfig",
    "PrefixCache",
    "TrainConfig",
    "TransformersPolicy",
    "UsageError",
    "bootstrap",
    "evaluate",
    "load_policy",
    "load_trees",
    "run_search",
    "train",
    "validate",
]

_LAZY = {
    "BootstrapConfig": "engine.tiny_model",
    "bootstrap": "engine.tiny_model",
    "TransformersPolicy": "engine.policy",
    "PrefixCache": "engine.prefix_cache",
    "evaluate": "engine.evaluate",
    "load_policy": "engine.run_inputs",
    "load_trees": "engine.show",
    "train": "engine.loop",
    "run_search": "engine.search_runner",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
