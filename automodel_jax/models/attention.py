"""Attention: the one attention function every model calls, and the decoder self-attention module of every family.

cuDNN flash attention (through `jax.nn.dot_product_attention(implementation="cudnn")`) on GPU for bf16/fp16 inputs
whose mask is expressible as causal + per-row valid length; an exact XLA implementation everywhere else (CPU, float32,
left padding, packed samples, soft-capping, the KV cache). Segment ids carry both padding (0) and packing (1..n): a
query attends to a key only in the same non-zero segment, at or before its slot, and within the sliding window (in
positions) if one is set.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from automodel_jax.models.kvcache import LayerCache
from automodel_jax.models.layers import Linear, RMSNorm, apply_rope
from automodel_jax.parallel.sharding import context_parallel, gather_kv

if TYPE_CHECKING:
    from automodel_jax.models.decoder import DecoderConfig

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_positions: jax.Array,
                   kv_positions: jax.Array, *, q_offset: jax.Array | int = 0,
                   sliding_window: int | None = None) -> jax.Array:
    """Boolean [B, 1, T, S]: query i (slot q_offset + i) may see key slot j.

    Iff j <= q_offset + i, the key's segment is non-zero and equal to the query's (padding queries, segment 0, see
    every earlier real key, as HF's padding mask has them do), and q_position - k_position < sliding_window.
    """
    t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    causal = jnp.arange(s)[None, :] <= q_offset + jnp.arange(t)[:, None]
    q_seg, kv_seg = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
    mask = causal[None] & (kv_seg != 0) & ((q_seg == kv_seg) | (q_seg == 0))
    if sliding_window is not None:
        mask &= q_positions[:, :, None] - kv_positions[:, None, :] < sliding_window
    return mask[:, None]


def _xla_attention(q, k, v, mask, scale, softcap):
    """Grouped-query attention in float32 softmax; q [B,T,N,D], k/v [B,S,K,D], mask [B,1,T,S]."""
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, d).astype(v.dtype)


def _use_cudnn(impl: str, q: jax.Array, softcap) -> bool:
    if impl == "xla":
        return False
    ok = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and softcap is None
    if impl == "cudnn" and not ok:
        raise ValueError(
            f"attention implementation 'cudnn' needs a GPU and bf16/fp16 inputs without soft-capping "
            f"(got backend {jax.default_backend()}, dtype {q.dtype}); use attention 'auto' or 'xla'")
    return ok


def attention(q, k, v, segment_ids=None, positions=None, *, right_padded: bool = False, scale: float | None = None,
              sliding_window: int | None = None, softcap: float | None = None, impl: str = "auto",
              cache: LayerCache | None = None):
    """Causal attention. q [B,T,N,D], k/v [B,S,K,D] (N a multiple of K); segment_ids, positions [B,T] or None.

    Without `cache`, k/v are the same T tokens as q. With `cache` (whose k/v, segment ids and positions already hold
    the new tokens at slots [index, index+T)), k/v are its S slots and the mask is `attention_mask`'s (XLA always).
    `right_padded=True` promises that every row is one sample followed by padding (segment ids 1...1 0...0), which
    lets cuDNN take valid lengths instead of a dense mask.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cache is None and context_parallel():
        # The sequence is sharded over `context`: queries stay sharded, keys/values are all-gathered (exact), and the
        # XLA path takes the global causal mask (cuDNN's kernel refuses sequence-sharded queries).
        if impl == "cudnn":
            raise ValueError("attention implementation 'cudnn' cannot run with context parallelism (mesh.context > 1);"
                             " use attention 'auto' or 'xla'")
        k, v = gather_kv(k, v)
    elif cache is None and _use_cudnn(impl, q, softcap) and (segment_ids is None or right_padded):
        lengths = None if segment_ids is None else jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0), implementation="cudnn")
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
    if cache is None:
        mask = attention_mask(segment_ids, segment_ids, positions, positions, sliding_window=sliding_window)
    else:
        mask = attention_mask(segment_ids, cache.segment_ids, positions, cache.positions, q_offset=cache.index,
                              sliding_window=sliding_window)
    return _xla_attention(q, k, v, mask, scale, softcap)


class DecoderAttention(nnx.Module):
    """Self-attention of every decoder family, with HF's submodule names.

    q_proj/k_proj/v_proj (or Phi-3's fused qkv_proj) and o_proj; optional per-head q_norm/k_norm (Qwen3, Gemma 3)
    applied before rope; the rope, sliding window, soft-cap and query scale of this layer from the config.
    """

    def __init__(self, cfg: "DecoderConfig", *, sliding: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.sliding_window = cfg.sliding_window if sliding else None
        self.rope = cfg.local_rope if sliding and cfg.local_rope is not None else cfg.rope
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap, self.impl, self.fused = cfg.attn_logit_softcap, cfg.attention_impl, cfg.fused_qkv
        h, hd = cfg.hidden_size, cfg.head_dim
        q_out, kv_out = self.num_heads * hd, self.num_kv_heads * hd
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)
        if self.fused:
            self.qkv_proj = Linear(h, q_out + 2 * kv_out, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
        else:
            self.q_proj = Linear(h, q_out, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
            self.k_proj = Linear(h, kv_out, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
            self.v_proj = Linear(h, kv_out, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(q_out, h, use_bias=cfg.o_bias, axes=("heads", "embed"), **kw)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, offset=cfg.norm_offset)
            self.q_norm, self.k_norm = RMSNorm(hd, **norm), RMSNorm(hd, **norm)

    def _project(self, x, dropout_rng):
        if self.fused:
            q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = jnp.split(self.qkv_proj(x, dropout_rng), [q_out, q_out + kv_out], axis=-1)
        else:
            q, k, v = self.q_proj(x, dropout_rng), self.k_proj(x, dropout_rng), self.v_proj(x, dropout_rng)
        b, t, _ = x.shape
        return (q.reshape(b, t, self.num_heads, self.head_dim), k.reshape(b, t, self.num_kv_heads, self.head_dim),
                v.reshape(b, t, self.num_kv_heads, self.head_dim))

    def __call__(self, x, positions, segment_ids, right_padded=False, dropout_rng=None,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """Output [B, T, hidden] and, with a cache, the cache with this call's keys and values written in."""
        q, k, v = self._project(x, dropout_rng)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = self.rope.inv_freq(self.head_dim, positions)
        q = apply_rope(q, positions, inv_freq, self.rope.attention_factor)
        k = apply_rope(k, positions, inv_freq, self.rope.attention_factor)
        if cache is not None:
            cache = cache.update(k, v)
            k, v = cache.k.astype(q.dtype), cache.v.astype(q.dtype)
        out = attention(q, k, v, segment_ids, positions, right_padded=right_padded, scale=self.scale,
                        sliding_window=self.sliding_window, softcap=self.softcap, impl=self.impl, cache=cache)
        return self.o_proj(out.reshape(*x.shape[:2], -1), dropout_rng), cache
