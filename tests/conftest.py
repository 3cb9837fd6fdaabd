"""Shared fixtures: the offline assets folder (tests needing it are skipped with one reason when it is absent) and
tiny random HF checkpoints written by transformers itself."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reference import ASSETS, ASSETS_ENV, STORIES, TINY, missing_assets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The commands turn JAX's persistent compilation cache on at start; in the test process (and the commands tests
# start) it stays off, so no test writes compiled programs to disk or loads another test's
# (tests/test_compilation_cache.py runs it on purpose).
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")


MISSING_ASSETS = missing_assets()


def skip_without_assets() -> None:
    """Skip the calling test when the assets are absent (every such skip is raised here, so that pytest's summary
    folds them into one line); fail it when the folder is there but incomplete."""
    if MISSING_ASSETS:
        reason, absent = MISSING_ASSETS
        (pytest.skip if absent else pytest.fail)(reason)


WORKERS = 2  # CI's cores; the suite takes about 13 minutes on 2 cores this way, 21 in one process


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Run the suite in WORKERS processes (pytest-xdist, whole files per worker so that a module's fixtures are built
    once), unless -n was given (`-n 0`: one process), only one test file was named, xdist is not installed, or the
    machine has an NVIDIA GPU (its tests share one device: one process). Runs before xdist's own hook, which reads the two options."""
    option = config.option
    one_file = len(config.args) == 1 and Path(config.args[0].split("::")[0]).is_file()  # one worker would idle
    if (config.pluginmanager.hasplugin("xdist") and getattr(option, "numprocesses", 0) is None and not one_file
            and not os.environ.get("PYTEST_XDIST_WORKER") and shutil.which("nvidia-smi") is None
            and not option.collectonly):
        option.numprocesses, option.dist = WORKERS, "loadfile"


def pytest_report_header(config):
    return f"offline test assets ({ASSETS_ENV}): {ASSETS}" + (
        "" if MISSING_ASSETS is None else " (not found)" if MISSING_ASSETS[1] else " (incomplete)")


def pytest_collection_modifyitems(config, items):
    """Tests using the `assets` fixture, directly or through another fixture, carry the `assets` marker too."""
    for item in items:
        if "assets" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.assets)


def pytest_runtest_setup(item):
    if item.get_closest_marker("assets"):
        skip_without_assets()


@pytest.fixture(scope="session")
def assets() -> Path:
    """The offline assets folder (skips the test when it is absent)."""
    skip_without_assets()
    return ASSETS


@pytest.fixture
def hf_model_factory(tmp_path):
    """make(model_cls_name, config_cls_name, **config) -> (torch HF model in eval mode, checkpoint dir).

    A tiny random `transformers.<model_cls_name>` written by its own save_pretrained. Norm weights and biases, which
    HF initialises to constants, get noise so that loading them wrongly shows in the logits.
    """
    import torch
    import transformers

    def make(model_cls_name, config_cls_name, name="ckpt", seed=0, max_shard_size=None, **overrides):
        torch.manual_seed(seed)
        config = getattr(transformers, config_cls_name)(**{**TINY, **overrides})
        model = getattr(transformers, model_cls_name)(config).eval()
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "norm" in param_name or param_name.endswith("bias"):
                    param.add_(0.1 * torch.randn_like(param))
        out = tmp_path / name
        model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        return model, out

    return make


@pytest.fixture
def hf_llama_factory(hf_model_factory):
    """make(**config) -> (torch HF Llama in eval mode, checkpoint dir written by save_pretrained)."""
    return lambda **overrides: hf_model_factory("LlamaForCausalLM", "LlamaConfig", **overrides)


@pytest.fixture(scope="session")
def stories_added_pad(tmp_path_factory, assets) -> Path:
    """stories260K whose tokenizer got an added pad token '<pad>' (id 512) while the model keeps its 512 embeddings:
    a tokenizer that does not fit its model, as after `tokenizer.add_special_tokens` without resizing."""
    import transformers
    out = tmp_path_factory.mktemp("stories_added_pad")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (out / name).symlink_to(STORIES / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(out)
    assert tokenizer.pad_token_id == 512
    return out
