"""Pieces shared by every implementation of the linear cross-entropy loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from automodel_jax.kernels.linear_cross_entropy import softcap


def masked_loss_sum(lse: jax.Array, target: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of lse - target over valid rows as float32, number of valid rows as int32)."""
    return jnp.sum(jnp.where(valid, lse - target, 0.0), dtype=jnp.float32), jnp.sum(valid, dtype=jnp.int32)


def logits_loss(logits: jax.Array, labels: jax.Array, ignore_index: int, cap: float | None):
    """For materialised logits [T, V]: the capped float32 logits, their row logsumexp, and (loss sum, count)."""
    capped = softcap(logits.astype(jnp.float32), cap)
    lse = jax.nn.logsumexp(capped, axis=-1)
    valid = labels != ignore_index
    target = jnp.take_along_axis(capped, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return capped, lse, masked_loss_sum(lse, target, valid)

