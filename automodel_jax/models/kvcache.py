"""The KV cache for generation: fixed-size per-layer key/value buffers, so prefill and decode are static-shaped.

A call with T new tokens writes them at slots [index, index+T) (`jax.lax.dynamic_update_slice`) and advances index;
slot metadata (segment ids, 0 = empty or padding, and positions) is shared by all layers and drives the attention
mask (`attention.attention_mask`). Prefill of T tokens and a decode of 1 token are two compiles; the index is traced.

Scanned decoder layers keep one stacked buffer [L, B, S, K, D] for keys and one for values instead of a tuple of L,
so that the scan over layers carries them and each layer writes its new tokens in place at its own index.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LayerCache(NamedTuple):
    """One layer's view during a call: its buffers, plus slot metadata that already includes the new tokens.

    With `layer` set, k and v are every layer's stacked buffers [L, B, S, K, D] and this view is layer `layer` of
    them (scanned layers: the scan carries the whole stack and each layer writes only its own slots)."""
    k: jax.Array  # [B, S, K, D] (or [L, B, S, K, D] with `layer`)
    v: jax.Array  # [B, S, K, D] (or [L, B, S, K, D] with `layer`)
    segment_ids: jax.Array  # [B, S]
    positions: jax.Array  # [B, S]
    index: jax.Array  # slot of the first new token
    layer: jax.Array | None = None  # this layer's index into stacked buffers (traced), None for its own buffers

    def update(self, k: jax.Array, v: jax.Array) -> "LayerCache":
        """Write this call's keys and values [B, T, K, D] at slots [index, index+T) (of this layer's buffers)."""
        if self.layer is None:
            at, k, v = (0, self.index, 0, 0), k, v
        else:
            at, k, v = (self.layer, 0, self.index, 0, 0), k[None], v[None]
        return self._replace(k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
                             v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at))

    def keys_values(self) -> tuple[jax.Array, jax.Array]:
        """This layer's key and value buffers [B, S, K, D]."""
        if self.layer is None:
            return self.k, self.v
        return (jax.lax.dynamic_index_in_dim(self.k, self.layer, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, self.layer, keepdims=False))


class KVCache(NamedTuple):
    """Per-layer k, v buffers [B, max_len, K, D] (a tuple of L each), or for scanned layers one stacked k and one
    stacked v [L, B, max_len, K, D]; segment_ids, positions [B, max_len]; index = slots filled so far.

    Callers keep index + T <= max_len (the index is traced, so an overflow cannot be checked inside jit).
    """
    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype,
               stacked: bool = False) -> "KVCache":
        """An empty cache; `stacked`: one [L, B, max_len, K, D] buffer for keys and one for values (scanned layers)."""
        if batch < 1 or max_len < 1:
            raise ValueError(f"KV cache needs batch >= 1 and max_len >= 1 (got batch {batch}, max_len {max_len})")
        shape = (batch, max_len, kv_heads, head_dim)

        def buffers():  # distinct arrays, so that a jitted step may donate the cache
            if stacked:
                return jnp.zeros((num_layers, *shape), dtype)
            return tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
        return cls(buffers(), buffers(), jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]

    @property
    def stacked(self) -> bool:
        """Whether the buffers are stacked [L, B, S, K, D] (scanned layers)."""
        return not isinstance(self.k, tuple)

    def for_tokens(self, segment_ids: jax.Array, positions: jax.Array) -> tuple[LayerCache, ...]:
        """Per-layer views for a call with these new tokens' segment ids and positions [B, T] (stacked buffers: one
        view per layer too, each with its `layer` index; a scan over layers takes them as `stacked_view`).

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
        if self.stacked:
            return tuple(LayerCache(self.k, self.v, seg, pos, self.index, jnp.int32(i)) for i in range(len(self.k)))
        return tuple(LayerCache(k, v, seg, pos, self.index) for k, v in zip(self.k, self.v))

    @classmethod
    def from_layers(cls, layers: tuple[LayerCache, ...] | list[LayerCache], num_tokens: int) -> "KVCache":
        """The cache after a call: the layers' updated buffers, index advanced past the call's tokens (stacked
        buffers: the last layer's view holds every layer's)."""
        first, last = layers[0], layers[-1]
        if last.layer is not None:
            return cls(last.k, last.v, first.segment_ids, first.positions, first.index + num_tokens)
        return cls(tuple(c.k for c in layers), tuple(c.v for c in layers), first.segment_ids, first.positions,
                   first.index + num_tokens)
