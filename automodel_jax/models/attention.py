"""The one attention function every model calls.

cuDNN flash attention (through `jax.nn.dot_product_attention(implementation="cudnn")`) on GPU for bf16/fp16 inputs
whose mask is expressible as causal + per-row valid length; an exact XLA implementation everywhere else (CPU, float32,
left padding, packed samples, soft-capping). Segment ids carry both padding (0) and packing (1..n): a query attends to
a key only in the same non-zero segment, at or before its position, and within the sliding window if one is set.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def segment_mask(segment_ids: jax.Array, sliding_window: int | None = None) -> jax.Array:
    """Boolean [B, 1, T, S] mask: causal, same segment, key not padding, inside the window."""
    seq = segment_ids.shape[1]
    pos = jnp.arange(seq)
    causal = pos[:, None] >= pos[None, :]
    if sliding_window is not None:
        causal &= pos[:, None] - pos[None, :] < sliding_window
    # Padding queries (segment 0) see every earlier real token, as HF's padding mask has them do.
    same = (segment_ids[:, :, None] == segment_ids[:, None, :]) | (segment_ids[:, :, None] == 0)
    valid_key = (segment_ids != 0)[:, None, :]
    return (causal[None] & same & valid_key)[:, None]


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


def attention(q, k, v, segment_ids=None, *, right_padded: bool = False, scale: float | None = None,
              sliding_window: int | None = None, softcap: float | None = None, impl: str = "auto"):
    """Causal attention. q [B,T,N,D], k/v [B,S,K,D] (N a multiple of K); segment_ids [B,T] or None.

    `right_padded=True` promises that every row is one sample followed by padding (segment ids 1...1 0...0), which
    lets cuDNN take valid lengths instead of a dense mask.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _use_cudnn(impl, q, softcap) and (segment_ids is None or right_padded):
        lengths = None if segment_ids is None else jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=None if sliding_window is None else (sliding_window - 1, 0), implementation="cudnn")
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return _xla_attention(q, k, v, segment_mask(segment_ids, sliding_window), scale, softcap)
