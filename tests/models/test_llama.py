"""Llama logits parity with HF torch on tiny random configs (float32, padded batches), plus config errors."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from automodel_jax import AutoModelForCausalLM
from automodel_jax.models.llama import LlamaConfig

CONFIGS = {
    "gqa_4_2": {},
    "mqa_4_1": dict(num_key_value_heads=1),
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=16), rope_theta=500000.0),
    "linear_rope_bias": dict(rope_scaling=dict(rope_type="linear", factor=2.0), attention_bias=True, mlp_bias=True),
    "odd_sizes_head_dim": dict(vocab_size=97, hidden_size=36, intermediate_size=55, num_attention_heads=6,
                               num_key_value_heads=3, head_dim=10, rms_norm_eps=1e-5, num_hidden_layers=3),
}


def _batch(vocab, left_pad=False):
    rng = np.random.RandomState(1)
    ids = rng.randint(0, vocab, (3, 13))
    mask = np.ones_like(ids)
    if left_pad:
        mask[1, :4] = 0
    else:
        mask[1, 9:] = 0
        mask[2, 5:] = 0
    return ids, mask


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf(hf_llama_factory, name):
    hf, path = hf_llama_factory(**CONFIGS[name])
    model = AutoModelForCausalLM.from_pretrained(path)
    ids, mask = _batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    assert out.shape == (3, 13, hf.config.vocab_size)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_left_padding_matches_hf_on_tokens(hf_llama_factory):
    hf, path = hf_llama_factory()
    model = AutoModelForCausalLM.from_pretrained(path)
    ids, mask = _batch(hf.config.vocab_size, left_pad=True)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)


def test_dynamic_rope_beyond_context_matches_hf(hf_llama_factory):
    hf, path = hf_llama_factory(max_position_embeddings=8, rope_scaling=dict(rope_type="dynamic", factor=2.0))
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = np.random.RandomState(2).randint(0, 101, (2, 13))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)


def test_bf16_compute_with_fp32_params(hf_llama_factory):
    hf, path = hf_llama_factory()
    model = AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16", param_dtype="float32")
    assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32
    ids, mask = _batch(hf.config.vocab_size)
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_act="xielu"), "hidden_act 'xielu' is not supported"),
    (dict(rope_scaling=dict(rope_type="su", factor=2.0)), "rope_scaling: rope type 'su' is not supported"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
])
def test_unsupported_config_values_are_clear_errors(bad, message):
    hf = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
              model_type="llama", **bad)
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(hf)
