"""Pure-XLA linear cross-entropy that never holds more than [chunk_size, V] logits.

Tokens are processed chunk by chunk in a lax.scan. Under differentiation the forward rule computes the gradients in the
same pass, while each chunk's logits are live (the loss is a plain sum, so its cotangent only rescales them): one
logits matmul plus the two gradient matmuls, instead of recomputing the logits in the backward. dW accumulates in
float32 over chunks. Inputs that are not differentiated (e.g. a frozen lm_head under LoRA) get no gradient work at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from automodel_jax.kernels.linear_cross_entropy import logit_grad
from automodel_jax.losses.common import logits_loss


def chunked_linear_cross_entropy(hidden, kernel, labels, *, chunk_size: int, ignore_index: int,
                                 logit_softcap: float | None) -> tuple[jax.Array, jax.Array]:
    """(loss sum float32, token count int32) of hidden [N, H] @ kernel [H, V] against labels [N].

    At most chunk_size tokens' logits are live at a time (chunks are balanced, so padding stays below one per chunk).
    """
    return _chunked_loss(chunk_size, ignore_index, logit_softcap)(hidden, kernel, labels)


def _split(hidden, labels, chunk_size: int, ignore_index: int):
    """[chunks, T, H] hidden and [chunks, T] labels, padded with ignored rows.

    Chunk c holds rows c, c + chunks, c + 2 * chunks, ...: a batch sharded by rows keeps every chunk spread over all
    its shards, so the scan does not serialise the devices.
    """
    n, h = hidden.shape
    chunks = -(-n // chunk_size)
    rows = -(-n // chunks)
    pad = rows * chunks - n
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad), constant_values=ignore_index)
    return hidden.reshape(rows, chunks, h).swapaxes(0, 1), labels.reshape(rows, chunks).T


def _merge(hidden_chunks, n: int):
    """Inverse of _split for a [chunks, T, H] array: [N, H] in the original row order."""
    return hidden_chunks.swapaxes(0, 1).reshape(-1, hidden_chunks.shape[-1])[:n]


def _scale(grad, cotangent):
    return None if grad is None else (grad.astype(jnp.float32) * cotangent).astype(grad.dtype)


@functools.lru_cache(maxsize=None)
def _chunked_loss(chunk_size: int, ignore_index: int, cap: float | None):
    def chunk_stats(h_chunk, label_chunk, kernel):
        logits = jnp.dot(h_chunk, kernel, preferred_element_type=jnp.float32)
        return logits_loss(logits, label_chunk, ignore_index, cap)

    @jax.custom_vjp
    def loss(hidden, kernel, labels):
        def body(carry, chunk):
            _, _, (loss_sum, count) = chunk_stats(*chunk, kernel)
            return (carry[0] + loss_sum, carry[1] + count), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        return lax.scan(body, init, _split(hidden, labels, chunk_size, ignore_index))[0]

    def fwd(hidden, kernel, labels):
        want_dh, want_dw = hidden.perturbed, kernel.perturbed
        hidden, kernel, labels = hidden.value, kernel.value, labels.value

        def body(carry, chunk):
            loss_sum, count, dw = carry
            h_chunk, label_chunk = chunk
            capped, lse, (chunk_loss, chunk_count) = chunk_stats(h_chunk, label_chunk, kernel)
            is_target = jnp.arange(capped.shape[1])[None, :] == label_chunk[:, None]
            valid = (label_chunk != ignore_index).astype(jnp.float32)
            dlogits = logit_grad(capped, lse, is_target, valid, cap).astype(hidden.dtype)
            dh = None
            if want_dh:
                dh = jnp.dot(dlogits, kernel.T, preferred_element_type=jnp.float32).astype(hidden.dtype)
            if want_dw:
                dw = dw + jnp.dot(h_chunk.T, dlogits, preferred_element_type=jnp.float32)
            return (loss_sum + chunk_loss, count + chunk_count, dw), dh

        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32),
                jnp.zeros(kernel.shape, jnp.float32) if want_dw else None)
        (loss_sum, count, dw), dh_chunks = lax.scan(body, init, _split(hidden, labels, chunk_size, ignore_index))
        dh = _merge(dh_chunks, hidden.shape[0]) if want_dh else None
        dw = dw.astype(kernel.dtype) if want_dw else None
        return (loss_sum, count), (dh, dw)

    def bwd(grads, cotangents):
        cotangent = cotangents[0]  # the count is an integer: its cotangent is always a symbolic zero
        dh, dw = grads
        return _scale(dh, cotangent), _scale(dw, cotangent), None

    loss.defvjp(fwd, bwd, symbolic_zeros=True)
    return loss
