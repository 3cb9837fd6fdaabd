"""Attention: the one attention function every model calls, and the decoder self-attention module of every family.

cuDNN flash attention on GPU for bf16/fp16 inputs whose mask is expressible as causal within contiguous samples:
right-padded rows (one sample + padding: per-row valid lengths) and packed rows (several samples one after another,
then padding: cuDNN's ragged "THD" layout, one (offset, length) pair per sample, so no [B, H, T, T] scores or mask
exist and no work is spent across samples); an exact XLA implementation everywhere else (CPU, float32, left padding,
rows without a layout promise, soft-capping, bidirectional blocks, the KV cache). Segment ids carry both padding (0)
and packing (1..n): a query attends to a key only in the same non-zero segment, at or before its slot, and within
the sliding window (in positions) if one is set.

Fused options for packed rows (checked against jax 0.10.2 here and jax-ml/jax main at 0.11.1.dev, Aug 2026):
- `jax.nn.dot_product_attention(implementation="cudnn")` takes per-row lengths only ([B]), or a dense `mask`/`bias`
  [B, 1, T, S], which cuDNN reads as an additive bias (T*S reads per head, no skipping of other samples' blocks;
  before jax 0.11.1 a boolean mask also made the backward pass compute dbias).
- `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` (which jax.nn calls) also takes `q_offsets` /
  `kv_offsets` [B, M+1] with lengths [B, M]: samples packed in a row as separate sequences, with gradients,
  PADDING_CAUSAL masking and `sliding_window_length` (cuDNN >= 9.x on Hopper or newer; no soft-capping, as no
  score modifier is exposed). jax < 0.11.1 scales kv_offsets by the query head count (jax commit be78ee0, "Fix cuDNN
  packed-attention kv_offsets for GQA/MQA"), so there keys/values are repeated to one head per query head. Used here.
- `jax.experimental.pallas.ops.gpu.attention.mha` has `segment_ids` and a backward pass but no GQA, sliding window
  or soft-capping, computes every block of a packed row, and is deprecated in jax 0.11 (in favour of tokamax, not
  installable on our GPU machine). Not used.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from jax._src.cudnn.fused_attention_stablehlo import MaskType
from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dot_product_attention

from automodel_jax.models.kvcache import LayerCache
from automodel_jax.parallel.sharding import context_parallel, gather_kv

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
log = logging.getLogger(__name__)
_logged_fallbacks: set[str] = set()
# jax releases from 0.11.1 on give cuDNN kv_offsets in key/value heads (commit be78ee0); older ones in query heads.
_PACKED_GQA_FIXED = jax.__version_info__ >= (0, 11, 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Everything attention needs besides the hidden states, built once per call and passed down every layer.

    segment_ids [B, T] int32: 0 = padding, 1..n = the sample a token belongs to (packing; one sample = all ones).
    positions [B, T] int32: rope positions (HF semantics: 0..T-1 unless given, e.g. restarting per packed sample).
    dropout_rng: PRNG key for LoRA dropout (None = no dropout: evaluation, generation).
    bidirectional_ids [B, T] int32 or None: tokens with the same non-zero id also see each other's later slots
        (Gemma 3's image tokens attend bidirectionally within their image).
    max_segments (static): the rows' layout, a promise that lets cuDNN take them. 1: every row is one sample followed
        by padding (segment ids 1..1 0..0: valid lengths). n > 1: every row is packed samples, each a contiguous run
        of one non-zero segment id with positions 0, 1, ... (what the packing loader writes), at most n runs per row,
        then padding (a ragged batch; breaking the promise leaves the extra runs' outputs zero). None: no promise.
    """
    segment_ids: jax.Array
    positions: jax.Array
    dropout_rng: jax.Array | None = None
    bidirectional_ids: jax.Array | None = None
    max_segments: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def build(cls, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
              positions: jax.Array | None = None, segment_ids: jax.Array | None = None, right_padded: bool = False,
              dropout_rng: jax.Array | None = None, cache_index: jax.Array | int | None = None) -> "AttentionInputs":
        """From HF-style arguments: positions default to 0..T-1 after the `cache_index` cached tokens (not shifted by
        left padding); `attention_mask` (1 = token, 0 = padding) becomes segment ids; all ones when neither is given.
        `right_padded` promises one sample per row followed by padding (max_segments 1).
        """
        # No mask and no segments: one unpadded sample per row, which the fused kernel takes as it is.
        right_padded = right_padded or (segment_ids is None and attention_mask is None)
        if segment_ids is None:
            segment_ids = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                           else jnp.asarray(attention_mask).astype(jnp.int32))
        if positions is None:
            offset = 0 if cache_index is None else cache_index
            positions = jnp.broadcast_to(offset + jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        return cls(jnp.asarray(segment_ids), jnp.asarray(positions), dropout_rng,
                   max_segments=1 if right_padded else None)


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


def ragged_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """cuDNN's ragged ("THD") description of packed rows: (lengths [B, M], offsets [B, M + 1], covered [B, T] bool).

    Each contiguous run of one non-zero segment id is a sample; a row's k-th run starts at slot offsets[b, k] and has
    lengths[b, k] tokens, in slot order. Entries past a row's last run are -1, as
    `fused_attention_stablehlo.dot_product_attention` wants them (M = `max_segments`). `covered` marks the slots of
    the first M runs: the only ones cuDNN computes (padding and any run beyond M are not).
    """
    b, t = segment_ids.shape
    real = segment_ids != 0
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    starts = real & (segment_ids != previous)
    run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # the run each slot belongs to (where real)
    covered = real & (run < max_segments)
    rows = jnp.arange(b)[:, None]
    lengths = jnp.zeros((b, max_segments), jnp.int32).at[rows, jnp.where(covered, run, max_segments)].add(
        1, mode="drop")
    runs = jnp.minimum(starts.sum(axis=1, dtype=jnp.int32), max_segments)[:, None]
    lengths = jnp.where(jnp.arange(max_segments)[None] < runs, lengths, -1)
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    offsets = jnp.full((b, max_segments + 1), -1, jnp.int32).at[
        rows, jnp.where(starts & covered, run, max_segments + 1)].set(slots, mode="drop")
    return lengths, offsets, covered


def _cudnn_attention(q, k, v, segment_ids, scale, sliding_window, max_segments):
    """cuDNN flash attention, causal within each sample: right-padded rows (max_segments 1: per-row valid lengths,
    segment ids 1..1 0..0) or packed rows (ragged offsets and lengths of up to `max_segments` runs per row).

    cuDNN does not define the slots outside its samples, in the output nor in dq, dk and dv (a bf16 train step on an
    H200 got NaN gradients from them), so those slots are zeroed on the way in and on the way out: `where` passes no
    cotangent to the slots it does not select, which keeps those values out of every gradient. Padding queries thus
    get 0 (XLA's attend to earlier tokens); no loss reads them. tests/models/test_attention_gpu.py checks this.
    """
    if max_segments == 1:
        covered = segment_ids != 0
        lengths, offsets = jnp.sum(covered, axis=1, dtype=jnp.int32), None
    else:
        lengths, offsets, covered = ragged_layout(segment_ids, max_segments)
    q, k, v = (jnp.where(covered[:, :, None, None], x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    if offsets is not None and not _PACKED_GQA_FIXED and k.shape[2] != q.shape[2]:
        k, v = (jnp.repeat(x, q.shape[2] // k.shape[2], axis=2) for x in (k, v))
    out = cudnn_dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                      kv_offsets=offsets, scale=scale, mask_type=MaskType.PADDING_CAUSAL,
                                      sliding_window_length=sliding_window)
    return jnp.where(covered[:, :, None, None], out, jnp.zeros((), out.dtype))


def _cudnn_refusal(impl: str, dtype, softcap, backend: str) -> str | None:
    """Why cuDNN's fused attention cannot run these inputs (None: it can); raises ValueError for impl 'cudnn'."""
    refusal = (f"backend {backend}" if backend != "gpu" else
               f"dtype {jnp.dtype(dtype).name}" if dtype not in (jnp.bfloat16, jnp.float16) else
               f"soft-capping {softcap}" if softcap is not None else None)
    if impl == "cudnn" and refusal:
        raise ValueError(
            f"attention implementation 'cudnn' needs a GPU and bf16/fp16 inputs without soft-capping "
            f"(got {refusal}); use attention 'auto' or 'xla'")
    return refusal


def cudnn_segments(inputs: AttentionInputs, dtype, softcap: float | None, impl: str,
                   backend: str | None = None) -> int | None:
    """How cuDNN takes these rows (self-attention, no cache): 1 (right-padded: valid lengths), n > 1 (packed:
    ragged, up to n samples a row) or None (the XLA path: impl 'xla', no layout promise, bidirectional blocks, or
    what cuDNN cannot do, such as float32 or soft-capping; on a GPU that last case is logged once per reason).
    `backend` defaults to jax's. Raises ValueError when impl is 'cudnn' and cuDNN cannot run these inputs."""
    if impl == "xla":
        return None
    backend = backend or jax.default_backend()
    refusal = _cudnn_refusal(impl, dtype, softcap, backend)
    segments = inputs.max_segments
    if segments is None or inputs.bidirectional_ids is not None:
        return None
    if refusal and backend == "gpu" and refusal not in _logged_fallbacks:
        _logged_fallbacks.add(refusal)
        log.warning("attention: %s rows take the XLA path (%s is not in cuDNN's fused attention), which materialises "
                    "[batch, heads, seq, seq] float32 scores", "right-padded" if segments == 1 else "packed", refusal)
    return None if refusal else segments


def attention(q, k, v, inputs: AttentionInputs, *, scale: float | None = None, sliding_window: int | None = None,
              softcap: float | None = None, impl: str = "auto", cache: LayerCache | None = None):
    """Causal attention. q [B,T,N,D], k/v [B,S,K,D] (N a multiple of K); `inputs` holds segment ids and positions.

    Without `cache`, k/v are the same T tokens as q. With `cache` (whose k/v, segment ids and positions already hold
    the new tokens at slots [index, index+T)), k/v are its S slots and the mask is `attention_mask`'s (XLA always).
    `inputs.max_segments` promises the rows' layout (right-padded: valid lengths; packed: a ragged batch), which lets
    cuDNN take them without a dense mask (see `cudnn_segments`). `inputs.bidirectional_ids` (Gemma 3's image blocks) let a query
    also see later keys of its own block; that mask is always XLA's.
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
    elif cache is None and (segments := cudnn_segments(inputs, q.dtype, softcap, impl)) is not None:
        return _cudnn_attention(q, k, v, segment_ids, scale, sliding_window, segments)
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
    if segment_ids is None and impl != "xla" and not _cudnn_refusal(impl, q.dtype, None, jax.default_backend()):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    if segment_ids is None:
        mask = jnp.ones((q.shape[0], 1, q.shape[1], k.shape[1]), bool)
    else:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return _xla_attention(q, k, v, mask, scale, None)
