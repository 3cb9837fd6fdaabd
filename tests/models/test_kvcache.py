"""KV cache: a jitted prefill plus token-by-token cached decode gives the uncached forward's logits (left-padded
batch, sliding windows, HF's unshifted positions and HF-generate-style shifted ones), in exactly two compiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from automodel_jax import AutoModelForCausalLM
from automodel_jax.models import KVCache
from reference import FAMILIES as ALL_FAMILIES

# Llama; a window on every layer; Gemma 3's alternating windows, per-layer rope, q/k norms and soft-capped logits.
FAMILIES = {"llama": ("LlamaForCausalLM", "LlamaConfig", {}), "mistral_sliding": ALL_FAMILIES["mistral_sliding"],
            "gemma3": ALL_FAMILIES["gemma3"]}
PROMPT, TOTAL, MAX_LEN = 5, 11, 16


def _batch(vocab):
    ids = np.random.RandomState(3).randint(0, vocab, (2, TOTAL)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("family, shifted_positions", [("llama", False), ("llama", True), ("mistral_sliding", True),
                                                      ("gemma3", True)])
def test_cached_decode_matches_uncached_forward(hf_model_factory, family, shifted_positions):
    model_cls, config_cls, overrides = FAMILIES[family]
    _, path = hf_model_factory(model_cls, config_cls, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids, mask = _batch(model.config.vocab_size)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) if shifted_positions else np.arange(TOTAL)[None] + 0 * ids
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def forward(state, ids, mask, positions):
        return nnx.merge(graphdef, state)(ids, mask, positions=positions)

    @jax.jit
    def step(state, ids, mask, positions, cache):
        traces.append(ids.shape)
        return nnx.merge(graphdef, state)(ids, mask, positions=positions, cache=cache)

    ref = np.asarray(forward(state, ids, mask, positions))
    cache = model.init_cache(2, MAX_LEN, jnp.float32)
    logits, cache = step(state, ids[:, :PROMPT], mask[:, :PROMPT], positions[:, :PROMPT], cache)
    outs = [logits]
    for t in range(PROMPT, TOTAL):
        logits, cache = step(state, ids[:, t:t + 1], mask[:, t:t + 1], positions[:, t:t + 1], cache)
        outs.append(logits)
    got = np.concatenate([np.asarray(o) for o in outs], axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-5, rtol=0)
    assert len(traces) == 2  # one prefill compile, one decode compile
    assert int(cache.index) == TOTAL
    np.testing.assert_array_equal(np.asarray(cache.segment_ids), np.pad(mask, ((0, 0), (0, MAX_LEN - TOTAL))))
    np.testing.assert_array_equal(np.asarray(cache.positions)[:, :TOTAL], positions)


def test_init_cache_layout(hf_llama_factory):
    _, path = hf_llama_factory()
    model = AutoModelForCausalLM.from_pretrained(path)
    cache = model.init_cache(3, 7, jnp.bfloat16)
    assert isinstance(cache, KVCache) and len(cache.k) == len(cache.v) == 2
    assert cache.k[0].shape == (3, 7, 2, 12) and cache.k[0].dtype == jnp.bfloat16
    assert cache.segment_ids.shape == cache.positions.shape == (3, 7) and cache.index.dtype == jnp.int32
    assert model.init_cache(1, 4).k[0].dtype == jnp.float32  # default: the compute dtype


def test_prefill_longer_than_cache_is_clear(hf_llama_factory):
    _, path = hf_llama_factory()
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="9 new tokens do not fit a KV cache of max_len 8"):
        model(jnp.zeros((1, 9), jnp.int32), cache=model.init_cache(1, 8))
    with pytest.raises(ValueError, match="max_len >= 1"):
        model.init_cache(1, 0)
