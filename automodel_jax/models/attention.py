"""Attention: the one attention function every model calls, and the decoder self-attention module of every family.

cuDNN flash attention (through `jax.nn.dot_product_attention(implementation="cudnn")`) on GPU for bf16/fp16 inputs
whose mask is expressible as causal + per-row valid length; an exact XLA implementation everywhere else (CPU, float32,
left padding, packed samples, soft-capping, the KV cache). Segment ids carry both padding (0) and packing (1..n): a
query attends to a key only in the same non-zero segment, at or before its slot, and within the sliding window (in
positions) if one is set.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from automodel_jax.models.kvcache import LayerCache
from automodel_jax.parallel.sharding import context_parallel, gather_kv

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Everything attention needs besides the hidden states, built once per call and passed down every layer.

    segment_ids [B, T] int32: 0 = padding, 1..n = the sample a token belongs to (packing; one sample = all ones).
    positions [B, T] int32: rope positions (HF semantics: 0..T-1 unless given, e.g. restarting per packed sample).
    dropout_rng: PRNG key for LoRA dropout (None = no dropout: evaluation, generation).
    bidirectional_ids [B, T] int32 or None: tokens with the same non-zero id also see each other's later slots
        (Gemma 3's image tokens attend bidirectionally within their image).
    right_padded (static): every row is one sample followed by padding, so cuDNN can take valid lengths.
    """
    segment_ids: jax.Array
    positions: jax.Array
    dropout_rng: jax.Array | None = None
    bidirectional_ids: jax.Array | None = None
    right_padded: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def build(cls, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
              positions: jax.Array | None = None, segment_ids: jax.Array | None = None, right_padded: bool = False,
              dropout_rng: jax.Array | None = None, cache_index: jax.Array | int | None = None) -> "AttentionInputs":
        """From HF-style arguments: positions default to 0..T-1 after the `cache_index` cached tokens (not shifted by
        left padding); `attention_mask` (1 = token, 0 = padding) becomes segment ids; all ones when neither is given.
        """
        # No mask and no segments: one unpadded sample per row, which the fused kernel takes as it is.
        right_padded = right_padded or (segment_ids is None and attention_mask is None)
        if segment_ids is None:
            segment_ids = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                           else jnp.asarray(attention_mask).astype(jnp.int32))
        if positions is None:
            offset = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(offset + jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        return cls(jnp.asarray(segment_ids), jnp.asarray(positions), dropout_rng, right_padded=right_padded)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_positions: jax.Array,
                   kv_positions: jax.Array, *, q_offset: jax.Array | int = 0,
                   sliding_window: int | None = None, q_bidirectional_ids: jax.Array | None = None,
                   kv_bidirectional_ids: jax.Array | None = None) -> jax.Array:
    """Boolean [B, 1, T, S]: query i (slot q_offset + i) may see key slot j.

    Iff j <= q_offset + i, the key's segment is non-zero and equal to the query's (padding queries, segment 0, see
    every earlier real key, as HF's padding mask has them do), and q_position - k_position < sliding_window.
    With bidirectional ids [B, T] / [B, S], a query also sees later keys of its own non-zero id (HF's blockwise
    overlay: OR-ed with the causal part, then padding, segments and the window apply as above).
    """
    t, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    visible = (jnp.arange(s)[None, :] <= q_offset + jnp.arange(t)[:, None])[None]
    if q_bidirectional_ids is not None:
        q_bid, kv_bid = q_bidirectional_ids[:, :, None], kv_bidirectional_ids[:, None, :]
        visible = visible | ((q_bid == kv_bid) & (q_bid != 0))
    q_seg, kv_seg = q_segment_ids[:, :, None], kv_segment_ids[:, None, :]
    mask = visible & (kv_seg != 0) & ((q_seg == kv_seg) | (q_seg == 0))
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


def _cudnn_attention(q, k, v, segment_ids, scale, sliding_window):
    """cuDNN flash attention of right-padded rows (segment ids 1..1 0..0), causal within each row's valid length.

    cuDNN does not define the slots past a row's length, in the output nor in dq, dk and dv (a bf16 train step on an
    H200 got NaN gradients from them), so padding is zeroed on the way in and on the way out: `where` passes no
    cotangent to the slots it does not select, which keeps those values out of every gradient. Padding queries thus
    get 0 (XLA's attend to earlier tokens); no loss reads them. tests/models/test_attention_gpu.py checks this.
    """
    real = segment_ids != 0
    q, k, v = (jnp.where(real[:, :, None, None], x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    lengths = jnp.sum(real, axis=1, dtype=jnp.int32)
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if sliding_window is None else (sliding_window - 1, 0), implementation="cudnn")
    return jnp.where(real[:, :, None, None], out, jnp.zeros((), out.dtype))


def _use_cudnn(impl: str, q: jax.Array, softcap) -> bool:
    if impl == "xla":
        return False
    ok = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and softcap is None
    if impl == "cudnn" and not ok:
        raise ValueError(
            f"attention implementation 'cudnn' needs a GPU and bf16/fp16 inputs without soft-capping "
            f"(got backend {jax.default_backend()}, dtype {q.dtype}); use attention 'auto' or 'xla'")
    return ok


def attention(q, k, v, inputs: AttentionInputs, *, scale: float | None = None, sliding_window: int | None = None,
              softcap: float | None = None, impl: str = "auto", cache: LayerCache | None = None):
    """Causal attention. q [B,T,N,D], k/v [B,S,K,D] (N a multiple of K); `inputs` holds segment ids and positions.

    Without `cache`, k/v are the same T tokens as q. With `cache` (whose k/v, segment ids and positions already hold
    the new tokens at slots [index, index+T)), k/v are its S slots and the mask is `attention_mask`'s (XLA always).
    `inputs.right_padded` promises that every row is one sample followed by padding (segment ids 1...1 0...0), which
    lets cuDNN take valid lengths instead of a dense mask. `inputs.bidirectional_ids` (Gemma 3's image blocks) let a
    query also see later keys of its own block; that mask is always XLA's.
    """
    segment_ids, positions = inputs.segment_ids, inputs.positions
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
    elif cache is None and _use_cudnn(impl, q, softcap) and inputs.right_padded and inputs.bidirectional_ids is None:
        return _cudnn_attention(q, k, v, segment_ids, scale, sliding_window)
    bid = inputs.bidirectional_ids
    if cache is None:
        mask = attention_mask(segment_ids, segment_ids, positions, positions, sliding_window=sliding_window,
                              q_bidirectional_ids=bid, kv_bidirectional_ids=bid)
    else:
        # Bidirectional blocks lie within one call (images are in the prompt): earlier slots are all id 0.
        kv_bid = None if bid is None else jax.lax.dynamic_update_slice(
            jnp.zeros_like(cache.segment_ids), bid.astype(cache.segment_ids.dtype), (0, cache.index))
        mask = attention_mask(segment_ids, cache.segment_ids, positions, cache.positions, q_offset=cache.index,
                              sliding_window=sliding_window, q_bidirectional_ids=bid, kv_bidirectional_ids=kv_bid)
    return _xla_attention(q, k, v, mask, scale, softcap)


def bidirectional_attention(q, k, v, segment_ids: jax.Array | None = None, *, scale: float | None = None,
                            impl: str = "auto") -> jax.Array:
    """Non-causal attention of vision encoders. q, k, v [B, T, N, D]; returns [B, T, N, D].

    `segment_ids` [B, T] (None = one block): a token sees only tokens of its own segment (Qwen2.5-VL's windows and
    images flattened into one row); padding is its own segment. cuDNN on GPU for bf16/fp16 without segments.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segment_ids is None and _use_cudnn(impl, q, None):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    if segment_ids is None:
        mask = jnp.ones((q.shape[0], 1, q.shape[1], k.shape[1]), bool)
    else:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return _xla_attention(q, k, v, mask, scale, None)
