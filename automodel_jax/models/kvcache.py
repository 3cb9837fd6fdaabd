"""The KV cache for generation: fixed-size per-layer key/value buffers, so prefill and decode are static-shaped.

A call with T new tokens writes them at slots [index, index+T) (`jax.lax.dynamic_update_slice`) and advances index;
slot metadata (segment ids, 0 = empty or padding, and positions) is shared by all layers and drives the attention
mask (`attention.attention_mask`). Prefill of T tokens and a decode of 1 token are two compiles; the index is traced.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LayerCache(NamedTuple):
    """One layer's view during a call: its buffers, plus slot metadata that already includes the new tokens."""
    k: jax.Array  # [B, S, K, D]
    v: jax.Array  # [B, S, K, D]
    segment_ids: jax.Array  # [B, S]
    positions: jax.Array  # [B, S]
    index: jax.Array  # slot of the first new token

    def update(self, k: jax.Array, v: jax.Array) -> "LayerCache":
        """Write this call's keys and values [B, T, K, D] at slots [index, index+T)."""
        at = (0, self.index, 0, 0)
        return self._replace(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
                             v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at))


class KVCache(NamedTuple):
    """Per-layer k, v buffers [B, max_len, K, D]; segment_ids, positions [B, max_len]; index = slots filled so far.

    Callers keep index + T <= max_len (the index is traced, so an overflow cannot be checked inside jit).
    """
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        if batch < 1 or max_len < 1:
            raise ValueError(f"KV cache needs batch >= 1 and max_len >= 1 (got batch {batch}, max_len {max_len})")
        def buffers():  # distinct arrays, so that a jitted step may donate the cache
            return tuple(jnp.zeros((batch, max_len, kv_heads, head_dim), dtype) for _ in range(num_layers))
        return cls(buffers(), buffers(), jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]

    def for_tokens(self, segment_ids: jax.Array, positions: jax.Array) -> tuple[LayerCache, ...]:
        """Per-layer views for a call with these new tokens' segment ids and positions [B, T].

        M-RoPE positions [3, B, T] are kept as their largest component per token (a text token's three are equal),
        so that decoding can continue each row after its largest position."""
        if positions.ndim == 3:
            positions = jnp.max(positions, axis=0)
        if segment_ids.shape[1] > self.max_len:
            raise ValueError(f"{segment_ids.shape[1]} new tokens do not fit a KV cache of max_len {self.max_len}; "
                             f"create the cache with a larger max_len")
        at = (0, self.index)
        seg = jax.lax.dynamic_update_slice(self.segment_ids, segment_ids.astype(jnp.int32), at)
        pos = jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), at)
        return tuple(LayerCache(k, v, seg, pos, self.index) for k, v in zip(self.k, self.v))

    @classmethod
    def from_layers(cls, layers: tuple[LayerCache, ...] | list[LayerCache], num_tokens: int) -> "KVCache":
        """The cache after a call: the layers' updated buffers, index advanced past the call's tokens."""
        first = layers[0]
        return cls(tuple(c.k for c in layers), tuple(c.v for c in layers), first.segment_ids, first.positions,
                   first.index + num_tokens)
