"""The planner's matmul FLOP count of a lowered program: loops by their trip counts, calls by their call counts."""
import jax
import jax.numpy as jnp

from automodel_jax.training.hlo_flops import matmul_flops


def dot_flops(m, k, n, batch=1):
    return 2 * batch * m * k * n


def test_a_scan_counts_its_body_once_per_step_and_a_call_once_per_call():
    def loss(x, w):
        y, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=3)
        g = jax.checkpoint(lambda a: jnp.tanh(a @ w))(y)
        return jnp.sum(g @ w.T)
    # The gradient's program keeps 9 dots of [8, 16] x [16, 16]: the scan's 3 forward and 3 backward (in two loops,
    # each calling a function per trip), the loss's backward, the checkpointed block recomputed and its backward.
    lowered = jax.jit(jax.grad(loss)).lower(jnp.ones((8, 16)), jnp.ones((16, 16)))
    assert matmul_flops(lowered.as_text()) == 9 * dot_flops(8, 16, 16)


def test_nested_scans_multiply_and_batch_dimensions_count():
    def nested(x, w):
        def outer(c, _):
            return jax.lax.scan(lambda d, _: (jnp.einsum("bij,jk->bik", d, w), None), c, None, length=4)[0], None
        return jax.lax.scan(outer, x, None, length=5)[0]
    lowered = jax.jit(nested).lower(jnp.ones((2, 8, 16)), jnp.ones((16, 16)))
    assert matmul_flops(lowered.as_text()) == 20 * dot_flops(8, 16, 16, batch=2)


def test_a_program_without_matmuls_has_none():
    assert matmul_flops(jax.jit(lambda x: x * 2).lower(jnp.ones(4)).as_text()) == 0.0
