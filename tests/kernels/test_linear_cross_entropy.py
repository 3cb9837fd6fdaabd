"""The Pallas tiles against plain XLA math: interpreted on CPU, compiled through Triton on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from automodel_jax.kernels.linear_cross_entropy import BlockConfig, default_block_config, logit_grads, logit_stats

# Small tiles so that tiny shapes still span several row and column blocks, plus ragged tails in every dimension.
SMALL = BlockConfig(block_n=16, block_v=32, block_k=16, group_n=2, num_warps=4, num_stages=2)
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")


def make_inputs(n, h, v, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    hidden = jax.random.normal(keys[0], (n, h), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(keys[1], (h, v), jnp.float32) * 2 * h ** -0.5).astype(dtype)
    labels = jax.random.randint(keys[2], (n,), 0, v)
    return hidden, kernel, labels


def reference_logits(hidden, kernel, cap):
    logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32, precision="highest")
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def test_logit_stats_match_xla():
    n, h, v = 37, 40, 101  # ragged against every tile dimension
    hidden, kernel, labels = make_inputs(n, h, v)
    labels = labels.at[5].set(-100)  # a label outside the vocabulary has no target logit
    # interpret=None: interpreted on a CPU (it must not try Triton there), compiled through Triton on a GPU.
    lse, target = logit_stats(hidden, kernel, labels, config=SMALL)
    logits = reference_logits(hidden, kernel, None)
    expected_target = jnp.where(labels >= 0, logits[jnp.arange(n), jnp.maximum(labels, 0)], 0.0)
    assert rel_err(lse, jax.nn.logsumexp(logits, axis=1)) < 1e-6
    assert rel_err(target, expected_target) < 1e-6


def test_logit_grads_of_a_ragged_vocabulary_slab():
    n, h, v, start, width, cap = 37, 40, 101, 30, 45, 2.0
    hidden, kernel, labels = make_inputs(n, h, v, seed=1)
    scale = jnp.where(jnp.arange(n) % 7 == 0, 0.0, 0.5)  # zero-scaled rows contribute nothing
    logits = reference_logits(hidden, kernel, cap)
    lse = jax.nn.logsumexp(logits, axis=1)
    dlogits = logit_grads(hidden, kernel[:, start:start + width], labels - start, lse, scale, cap=cap, config=SMALL,
                          interpret=True)
    expected = (jax.nn.softmax(logits, axis=1) - jax.nn.one_hot(labels, v)) * (1 - jnp.square(logits / cap))
    expected = (expected * scale[:, None])[:, start:start + width]
    assert dlogits.shape == (n, width) and dlogits.dtype == hidden.dtype
    assert rel_err(dlogits, expected) < 1e-6


@pytest.mark.parametrize("field, value", [("block_n", 48), ("block_v", 8), ("block_k", "64"), ("num_warps", 0),
                                          ("group_n", -1)])
def test_block_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        BlockConfig(**{field: value})


def test_default_block_config_by_dtype():
    assert default_block_config(jnp.bfloat16).block_v >= 128
    f32 = default_block_config(jnp.float32)
    assert f32.block_n * f32.block_v * f32.block_k < BlockConfig().block_n * BlockConfig().block_v * 64


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 1e-5), (jnp.float32, 1e-5)])
def test_triton_kernels_match_xla_on_gpu(dtype, tol):
    n, h, v, cap = 1000, 384, 5003, 30.0  # ragged in every dimension against the default tiles
    hidden, kernel, labels = make_inputs(n, h, v, dtype=dtype, seed=2)
    lse, target = logit_stats(hidden, kernel, labels, cap=cap)
    logits = reference_logits(hidden, kernel, cap)
    assert rel_err(lse, jax.nn.logsumexp(logits, axis=1)) < tol
    assert rel_err(target, logits[jnp.arange(n), labels]) < tol
    scale = jnp.full((n,), 0.25)
    dlogits = logit_grads(hidden, kernel[:, 1000:3000], labels - 1000, lse, scale, cap=cap)
    expected = (jax.nn.softmax(logits, axis=1) - jax.nn.one_hot(labels, v)) * (1 - jnp.square(logits / cap))
    # dlogits is rounded to the compute dtype.
    assert rel_err(dlogits, 0.25 * expected[:, 1000:3000]) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)
