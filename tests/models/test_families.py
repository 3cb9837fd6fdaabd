"""Every family beyond Llama: logits parity with HF torch on tiny random configs (float32, right- and left-padded
rows), HF module names for every Linear, legacy config.json layouts, and unsupported config values as clear errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from automodel_jax import AutoModelForCausalLM
from automodel_jax.models import supported_model_types
from automodel_jax.models.layers import Linear
from reference import FAMILIES, TINY


def _batch(vocab):
    """Three rows of 13 tokens: full, right-padded, left-padded."""
    ids = np.random.RandomState(1).randint(0, vocab, (3, 13))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :4] = 0
    return ids, mask


def _logits(model, ids, mask=None):
    """One compile instead of many eager ops."""
    mask = None if mask is None else jnp.asarray(mask)
    return np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(ids), mask))


def _assert_logits_match(hf, model):
    ids, mask = _batch(hf.config.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = _logits(model, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_hf_and_linears_have_hf_names(hf_model_factory, name):
    model_cls, config_cls, overrides = FAMILIES[name]
    hf, path = hf_model_factory(model_cls, config_cls, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path)
    _assert_logits_match(hf, model)
    ours = {".".join(map(str, p)) for p, node in nnx.iter_graph(model) if isinstance(node, Linear)}
    theirs = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    assert ours == theirs - ({"lm_head"} if hf.config.tie_word_embeddings else set())
    assert model.logit_softcap == getattr(hf.config, "final_logit_softcapping", None)


def test_final_logit_softcap_binds(hf_model_factory):
    _, path = hf_model_factory(*FAMILIES["gemma2"][:2], **FAMILIES["gemma2"][2])
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.logit_softcap == 1.0
    logits = _logits(model, _batch(101)[0])
    assert np.abs(logits).max() <= 1.0 and np.abs(logits).max() > 0.9  # the cap binds on these weights


def test_longrope_switches_factors_at_the_original_length(hf_model_factory):
    hf, path = hf_model_factory(*FAMILIES["phi3_longrope"][:2], **FAMILIES["phi3_longrope"][2])
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.rope.attention_factor == pytest.approx((1 + np.log(4) / np.log(8)) ** 0.5)
    for length in (8, 9):  # max position 7: short factors; 8: long factors
        ids = np.random.RandomState(length).randint(0, 101, (1, length))
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        np.testing.assert_allclose(_logits(model, ids), ref, atol=1e-4, rtol=0)


def test_gemma3_legacy_config_layout(hf_model_factory):
    """Hub configs from before transformers 5: flat rope_theta / rope_scaling / rope_local_base_freq and a
    sliding_window_pattern instead of layer_types."""
    hf, path = hf_model_factory(*FAMILIES["gemma3"][:2], **FAMILIES["gemma3"][2])
    cfg = json.loads((path / "config.json").read_text())
    del cfg["layer_types"], cfg["rope_parameters"], cfg["_sliding_window_pattern"]
    cfg.update(sliding_window_pattern=2, rope_theta=50.0, rope_local_base_freq=7.0,
               rope_scaling=dict(rope_type="linear", factor=2.0))
    (path / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    _assert_logits_match(hf, model)


def test_every_family_is_registered():
    assert set(supported_model_types()) >= {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"}


@pytest.mark.parametrize("model_type, bad, message", [
    ("phi3", dict(rope_scaling=dict(rope_type="su", short_factor=[1.0] * 6, long_factor=[1.0] * 6)),
     r"rope_scaling: rope type 'su' is not supported"),
    ("phi3", dict(rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 5, long_factor=[1.0] * 6)),
     r"rope_scaling: longrope needs short_factor with 6 numbers"),
    ("llama", dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0\.5 is not supported"),
    ("qwen2", dict(hidden_act="relu2"), r"hidden_act 'relu2' is not supported for qwen2"),
    ("gemma2", dict(hidden_activation="gelu_10"), r"hidden_activation 'gelu_10' is not supported for gemma2"),
    ("gemma2", dict(use_bidirectional_attention=True), r"use_bidirectional_attention is not supported"),
    ("gemma2", dict(sliding_window=None), r"sliding_attention layers but sliding_window is not set"),
    ("gemma3_text", dict(layer_types=["full_attention"]), r"layer_types has 1 entries but num_hidden_layers is 2"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=8, layer_types=["chunked_attention"] * 2),
     r"layer_types entry 'chunked_attention' is not supported"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0}}),
     r"rope_parameters\.full_attention: rope type 'yarn' is not supported"),
])
def test_unsupported_config_values_are_clear_errors(model_type, bad, message):
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_config({**TINY, "model_type": model_type, **bad})


def test_remat_keeps_logits_and_gradients(hf_model_factory):
    _, path = hf_model_factory(*FAMILIES["gemma2"][:2], **FAMILIES["gemma2"][2])
    ids, mask = (jnp.asarray(a) for a in _batch(101))

    def loss_and_grads(remat):
        model = AutoModelForCausalLM.from_pretrained(path, remat=remat)
        return nnx.jit(nnx.value_and_grad(lambda m: jnp.mean(m(ids, mask) ** 2)))(model)

    (loss, grads), (loss_remat, grads_remat) = loss_and_grads("none"), loss_and_grads("full")
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4), nnx.to_pure_dict(grads),
                 nnx.to_pure_dict(grads_remat))
