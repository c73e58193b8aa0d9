"""Shared fixtures: a tiny randomly initialised Llama with the engine's character tokenizer, and a
briefly trained default model (a real bootstrap with a small step budget)."""

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the models in the tests that generate, search and train with them "
                          "(cpu, cuda, cuda:1, ...; default cpu), e.g. pytest --device cuda tests/engine")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The ``--device`` those tests put their models on."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: torch sees no CUDA device on this machine")
    return device


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Never touch the user's model cache from tests."""
    old = os.environ.get("ENGINE_CACHE")
    os.environ["ENGINE_CACHE"] = str(tmp_path_factory.mktemp("engine-cache"))
    torch.set_num_threads(2)
    yield
    if old is None:
        os.environ.pop("ENGINE_CACHE", None)
    else:
        os.environ["ENGINE_CACHE"] = old


@pytest.fixture()
def tiny_random():
    from engine.tiny_model import BootstrapConfig, build_model, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(BootstrapConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                        len(tok), tok.pad_token_id, tok.eos_token_id)
    return model, tok


QUICK_BOOTSTRAP = dict(max_steps=60, eval_every=30, quick_eval_size=16, target_accuracy=0.0,
                       hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)


@pytest.fixture()
def quick_bootstrap():
    """Keyword arguments for a BootstrapConfig that trains in seconds."""
    return dict(QUICK_BOOTSTRAP)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """A real (short) bootstrap: the same code path as the default model, 60 SFT steps."""
    from engine.tiny_model import BootstrapConfig, bootstrap

    return bootstrap(BootstrapConfig(**QUICK_BOOTSTRAP), cache_dir=tmp_path_factory.mktemp("boot"),
                     log=lambda s: None)
