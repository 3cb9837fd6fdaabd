"""linear_cross_entropy: chunked and pallas (interpreted off-GPU) against the naive float32-logits reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from automodel_jax.kernels.linear_cross_entropy import BlockConfig
from automodel_jax.losses import linear_cross_entropy
from automodel_jax.losses.pallas import pallas_linear_cross_entropy

SMALL_TILES = BlockConfig(block_n=16, block_v=64, block_k=16, group_n=2, num_warps=4, num_stages=2)
on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """float32 comparisons need float32 matmuls in XLA too (a GPU would otherwise use TF32)."""
    with jax.default_matmul_precision("highest"):
        yield


def make_inputs(n, h, v, dtype=jnp.float32, ignored=0.2, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    hidden = jax.random.normal(keys[0], (n, h), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(keys[1], (h, v), jnp.float32) * 2 * h ** -0.5).astype(dtype)
    labels = jax.random.randint(keys[2], (n,), 0, v)
    labels = jnp.where(jax.random.uniform(keys[3], (n,)) < ignored, -100, labels)
    return hidden, kernel, labels


def loss_and_grads(loss_fn, hidden, kernel, labels, argnums=(0, 1), cotangent=0.37):
    """(loss sum, count, grads) with a non-unit cotangent, as when the caller divides by a global token count."""
    def scaled(h, w):
        loss_sum, count = loss_fn(h, w, labels)
        return cotangent * loss_sum, (loss_sum, count)

    (_, (loss_sum, count)), grads = jax.jit(jax.value_and_grad(scaled, argnums=argnums, has_aux=True))(hidden, kernel)
    return loss_sum, count, grads


def impl_fn(impl, chunk_size=None, logit_softcap=None):
    if impl == "pallas-small-tiles":
        return lambda h, w, y: pallas_linear_cross_entropy(h, w, y, chunk_size=chunk_size or 128, ignore_index=-100,
                                                           logit_softcap=logit_softcap, config=SMALL_TILES)
    return lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl, chunk_size=chunk_size,
                                                logit_softcap=logit_softcap)


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def assert_matches_naive(actual, expected, loss_tol, grad_tol):
    (loss, count, grads), (ref_loss, ref_count, ref_grads) = actual, expected
    assert int(count) == int(ref_count)
    assert abs(float(loss) - float(ref_loss)) <= loss_tol * abs(float(ref_loss))
    for grad, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert grad.dtype == ref.dtype and grad.shape == ref.shape
        assert rel_err(grad, ref) < grad_tol


def test_naive_matches_a_float64_numpy_loss():
    hidden, kernel, labels = make_inputs(9, 8, 11)
    loss_sum, count = linear_cross_entropy(hidden, kernel, labels, impl="naive")
    logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
    lse = np.log(np.exp(logits).sum(axis=1))
    valid = np.asarray(labels) != -100
    expected = sum(lse[i] - logits[i, labels[i]] for i in np.flatnonzero(valid))
    assert int(count) == valid.sum() > 0
    assert abs(float(loss_sum) - expected) < 1e-5 * expected


# Odd N and V (509 is prime), chunk sizes that leave a tail, and a cap for Gemma 2.
@pytest.mark.parametrize("impl, chunk_size, n, v, cap", [
    ("chunked", 8, 37, 509, None), ("chunked", 8, 21, 1000, 5.0),
    ("pallas", 200, 37, 509, 5.0), ("pallas-small-tiles", 128, 21, 1000, None)])
def test_float32_matches_naive(impl, chunk_size, n, v, cap):
    hidden, kernel, labels = make_inputs(n, 40, v)
    expected = loss_and_grads(impl_fn("naive", logit_softcap=cap), hidden, kernel, labels)
    actual = loss_and_grads(impl_fn(impl, chunk_size, cap), hidden, kernel, labels)
    assert_matches_naive(actual, expected, loss_tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "pallas-small-tiles"])
def test_bfloat16_matches_naive(impl):
    hidden, kernel, labels = make_inputs(45, 64, 509, dtype=jnp.bfloat16)
    expected = loss_and_grads(impl_fn("naive", logit_softcap=30.0), hidden, kernel, labels)
    actual = loss_and_grads(impl_fn(impl, 16 if impl == "chunked" else 256, 30.0), hidden, kernel, labels)
    # Same float32 logits; only the bf16 rounding of dlogits before the gradient matmuls differs.
    assert_matches_naive(actual, expected, loss_tol=1e-4, grad_tol=2e-2)


def count_matmuls(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_frozen_kernel_gets_hidden_gradient_only(impl):
    """The LoRA case: only hidden is differentiated, so the fused impls skip the dW matmul."""
    hidden, kernel, labels = make_inputs(19, 24, 300)
    expected = loss_and_grads(impl_fn("naive"), hidden, kernel, labels, argnums=0)
    chunk_size = 64 if impl == "chunked" else 100  # pallas: three vocabulary slabs, one scan body, no tail
    actual = loss_and_grads(impl_fn(impl, chunk_size), hidden, kernel, labels, argnums=0)
    assert_matches_naive(actual, expected, loss_tol=1e-5, grad_tol=1e-5)
    loss = lambda h, w: impl_fn(impl, chunk_size)(h, w, labels)[0]  # noqa: E731
    both = count_matmuls(jax.grad(loss, argnums=(0, 1)), hidden, kernel)
    assert count_matmuls(jax.grad(loss), hidden, kernel) == both - 1


@pytest.mark.parametrize("impl", ["naive", "chunked", "pallas"])
def test_all_labels_ignored_gives_zero_and_finite_grads(impl):
    hidden, kernel, labels = make_inputs(13, 16, 130, ignored=1.0)
    loss_sum, count, grads = loss_and_grads(impl_fn(impl, 32), hidden, kernel, labels)
    assert float(loss_sum) == 0.0 and int(count) == 0
    assert count.dtype == jnp.int32 and loss_sum.dtype == jnp.float32
    for grad in grads:
        assert np.all(np.asarray(grad) == 0)


def test_kernel_is_cast_to_the_compute_dtype():
    hidden, kernel, labels = make_inputs(16, 32, 100, dtype=jnp.bfloat16)
    loss = lambda w: linear_cross_entropy(hidden, w, labels, impl="naive")[0]  # noqa: E731
    assert float(loss(kernel.astype(jnp.float32))) == float(loss(kernel))
    assert jax.grad(loss)(kernel.astype(jnp.float32)).dtype == jnp.float32


def test_loss_without_gradients_runs_the_primal_path():
    hidden, kernel, labels = make_inputs(30, 16, 77)
    ref = linear_cross_entropy(hidden, kernel, labels, impl="naive")
    for impl in ("chunked", "pallas"):
        loss_sum, count = jax.jit(lambda h, w, y, impl=impl: linear_cross_entropy(h, w, y, impl=impl))(
            hidden, kernel, labels)
        assert int(count) == int(ref[1]) and abs(float(loss_sum) - float(ref[0])) < 1e-5 * float(ref[0])


@pytest.mark.parametrize("change, error, match", [
    (dict(impl="fast"), ValueError, "impl='fast'"),
    (dict(hidden=jnp.zeros((2, 3, 8))), ValueError, "flatten batch and sequence"),
    (dict(kernel=jnp.zeros((9, 50))), ValueError, "embedding.T"),
    (dict(labels=jnp.zeros((5,), jnp.int32)), ValueError, "do not line up"),
    (dict(hidden=jnp.zeros((0, 8)), labels=jnp.zeros((0,), jnp.int32)), ValueError, "empty input"),
    (dict(hidden=jnp.zeros((4, 8), jnp.int32)), TypeError, "floating point"),
    (dict(labels=jnp.zeros((4,), jnp.float32)), TypeError, "labels must be integers"),
    (dict(chunk_size=0), ValueError, "chunk_size=0"),
    (dict(logit_softcap=-1.0), ValueError, "logit_softcap=-1.0"),
])
def test_bad_arguments_raise_clear_errors(change, error, match):
    args = dict(hidden=jnp.zeros((4, 8)), kernel=jnp.zeros((8, 50)), labels=jnp.zeros((4,), jnp.int32))
    args.update(change)
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("impl", ["pallas", "chunked"])
def test_realistic_shape_matches_naive_on_gpu(impl):
    hidden, kernel, labels = make_inputs(8192, 2048, 128256, dtype=jnp.bfloat16, ignored=0.1)
    expected = loss_and_grads(impl_fn("naive"), hidden, kernel, labels)
    actual = loss_and_grads(impl_fn(impl), hidden, kernel, labels)
    assert_matches_naive(actual, expected, loss_tol=1e-4, grad_tol=2e-2)
