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


TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)

# One tiny config per supported family beyond plain Llama: (HF model class, HF config class, config overrides).
# Windows are shorter than the 13-token test sequences so that they matter; weights are larger than HF's default
# so that soft-caps bite.
GEMMA = dict(initializer_range=0.2, head_dim=16, query_pre_attn_scalar=10, sliding_window=3)
FAMILIES = {
    "qwen2_tied": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen2_sliding": ("Qwen2ForCausalLM", "Qwen2Config",
                      dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=16)),
    "qwen3_bias_tied": ("Qwen3ForCausalLM", "Qwen3Config", dict(attention_bias=True, tie_word_embeddings=True)),
    "mistral_sliding": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=3)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config",
               dict(GEMMA, num_hidden_layers=3, final_logit_softcapping=1.0, attn_logit_softcapping=2.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(GEMMA, num_hidden_layers=3, layer_types=["sliding_attention", "full_attention",
                                                                 "sliding_attention"],
                    rope_theta=50.0, rope_local_base_freq=7.0, rope_scaling=dict(rope_type="linear", factor=2.0),
                    final_logit_softcapping=1.5)),
    "phi3_sliding_partial_rope": ("Phi3ForCausalLM", "Phi3Config",
                                  dict(sliding_window=4, partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=2)),
    "phi3_longrope": ("Phi3ForCausalLM", "Phi3Config",
                      dict(pad_token_id=0, eos_token_id=2, max_position_embeddings=32,
                           original_max_position_embeddings=8,
                           rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0],
                                             long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 40.0]))),
}


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


def assert_same_state(a, b):
    """Two torch modules hold bit-identical tensors under the same names and dtypes."""
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.fixture
def hf_llama_factory(hf_model_factory):
    """make(**config) -> (torch HF Llama in eval mode, checkpoint dir written by save_pretrained)."""
    return lambda **overrides: hf_model_factory("LlamaForCausalLM", "LlamaConfig", **overrides)
