"""Shared fixtures: the offline assets folder and tiny random HF checkpoints written by transformers itself."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def require_assets():
    if not STORIES.is_dir():
        pytest.fail(f"test assets missing at {ASSETS}: the repository must sit beside shared/assets")


@pytest.fixture
def assets() -> Path:
    require_assets()
    return ASSETS


@pytest.fixture
def hf_llama_factory(tmp_path):
    """make(**config) -> (torch HF model in eval mode, checkpoint dir written by save_pretrained)."""
    import torch
    import transformers

    def make(name="ckpt", seed=0, max_shard_size=None, **overrides):
        cfg = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
        cfg.update(overrides)
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
        out = tmp_path / name
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(out, **kwargs)
        return model, out

    return make
