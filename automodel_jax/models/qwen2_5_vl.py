"""Qwen2.5-VL (`qwen2_5_vl`): a windowed vision transformer whose merged patch features replace the image placeholder
tokens of a Qwen2 text decoder with multimodal rotary positions (M-RoPE).

The module tree is the checkpoint's (what transformers' save_pretrained writes and the Hub checkpoints hold):
`visual.patch_embed.proj`, `visual.blocks.N.{norm1, norm2, attn.qkv, attn.proj, mlp.gate_proj/up_proj/down_proj}`,
`visual.merger.{ln_q, mlp.0, mlp.2}`, `model.{embed_tokens, layers.N.*, norm}` (the Qwen2 decoder) and `lm_head`.

Everything that depends on the values of `image_grid_thw` is computed on the host in numpy, so that jitted code sees
only static-shaped arrays: `vision_inputs` (window permutation, per-window and per-frame attention segments, 2-D
rotary positions of the vision tower) and `rope_index` (the text's M-RoPE positions [3, B, T], as transformers'
`get_rope_index` computes them). The public call computes both when they are not given.

Images only (no videos), in one of two layouts. Flat: all images of a batch form one vision sequence
(pixel_values [N, patch_dim]), as in transformers; the public call takes this. Per row (training): pixel_values
[B, P, patch_dim], each row its own vision sequence of its real patches then padding, with the index arrays of
`vision_inputs` per row stacked [B, ...] and M-RoPE positions [B, 3, T]; `host_batch` builds these from the VLM
collator's batch, every array with the batch axis first, and training calls
`hidden_states(input_ids, AttentionInputs(segment_ids, positions), **model_inputs)`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from automodel_jax.models.attention import AttentionInputs, bidirectional_attention
from automodel_jax.models.base import register, remat_policy
from automodel_jax.models.decoder import DecoderConfig, DecoderLM, hf_base_fields
from automodel_jax.models.kvcache import KVCache
from automodel_jax.models.layers import ACTIVATIONS, Linear, RMSNorm, RopeConfig, _init, apply_rope

MODEL_TYPE = "qwen2_5_vl"
VISION_EPS = 1e-6  # transformers hard-codes the vision RMSNorm epsilon


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (HF `vision_config`); defaults are transformers' Qwen2_5_VLVisionConfig ones."""
    depth: int = 32
    hidden_size: int = 3584
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Features of one flattened patch of pixel_values: in_channels * temporal_patch_size * patch_size ** 2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf(cls, hf: dict) -> "VisionConfig":
        where = "config.json: vision_config"
        d = cls()
        get = lambda key, default: default if hf.get(key) is None else hf[key]  # noqa: E731
        rope = dict(hf.get("rope_parameters") or {})
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"{where}.rope_parameters: rope type {rope['rope_type']!r} is not supported; "
                             f"supported: ('axial',)")
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(hf.get(key), (list, tuple)):
                raise ValueError(f"{where}.{key} {hf[key]} is not supported; give one integer")
        cfg = cls(depth=get("depth", d.depth), hidden_size=get("hidden_size", d.hidden_size),
                  intermediate_size=get("intermediate_size", d.intermediate_size),
                  num_heads=get("num_heads", d.num_heads),
                  in_channels=get("in_channels", get("in_chans", d.in_channels)),
                  patch_size=get("patch_size", d.patch_size),
                  temporal_patch_size=get("temporal_patch_size", d.temporal_patch_size),
                  spatial_merge_size=get("spatial_merge_size", d.spatial_merge_size),
                  window_size=get("window_size", d.window_size), out_hidden_size=get("out_hidden_size",
                                                                                     d.out_hidden_size),
                  fullatt_block_indexes=tuple(get("fullatt_block_indexes", d.fullatt_block_indexes)),
                  hidden_act=get("hidden_act", d.hidden_act), rope_theta=float(rope.get("rope_theta", d.rope_theta)),
                  tokens_per_second=get("tokens_per_second", d.tokens_per_second))
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{where}.hidden_act {cfg.hidden_act!r} is not supported for {MODEL_TYPE}; supported: "
                             f"{tuple(ACTIVATIONS)}")
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise ValueError(f"{where}: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must be a whole "
                             f"head dimension divisible by 4 (2-D rotary embedding)")
        if cfg.window_size // cfg.spatial_merge_size // cfg.patch_size < 1:
            raise ValueError(f"{where}: window_size {cfg.window_size} must be at least spatial_merge_size * "
                             f"patch_size = {cfg.spatial_merge_size * cfg.patch_size}")
        bad = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"{where}: fullatt_block_indexes entry {bad[0]} is not a block index (depth "
                             f"{cfg.depth})")
        return cfg


def _mrope(text: dict) -> RopeConfig:
    """The text rope: default rope whose frequencies are split by `mrope_section` over (temporal, height, width)."""
    params = dict(text.get("rope_parameters") or {})
    params.update(text.get("rope_scaling") or {})
    params.setdefault("rope_theta", text.get("rope_theta", 1_000_000.0))
    section = params.pop("mrope_section", None) or [16, 24, 24]
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"config.json: rope_parameters: rope type {kind!r} is not supported for {MODEL_TYPE}; "
                         f"supported: ('default', 'mrope')")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if sum(section) != head_dim // 2:
        raise ValueError(f"config.json: rope_parameters.mrope_section {list(section)} sums to {sum(section)} but "
                         f"head_dim / 2 is {head_dim // 2}")
    rope = RopeConfig.parse({**params, "rope_type": "default"}, key="rope_parameters", head_dim=head_dim,
                            max_position_embeddings=text.get("max_position_embeddings", 32768))
    return dataclasses.replace(rope, mrope_section=tuple(int(n) for n in section))


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig(DecoderConfig):
    """The text decoder's DecoderConfig (Qwen2: q/k/v biases, M-RoPE in `rope.mrope_section`) plus the vision tower
    and the special token ids."""
    vision: VisionConfig = VisionConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @classmethod
    def from_hf(cls, hf: dict) -> "Qwen2_5_VLConfig":
        text = hf.get("text_config") or hf  # transformers >= 5 nests the text fields; older configs are flat
        if text["hidden_size"] % text["num_attention_heads"]:
            raise ValueError(f"config.json: hidden_size {text['hidden_size']} is not a multiple of "
                             f"num_attention_heads {text['num_attention_heads']}")
        if text.get("use_sliding_window"):
            raise ValueError(f"config.json: use_sliding_window is not supported for {MODEL_TYPE} (transformers "
                             f"ignores it outside flash attention); set it to false")
        fields = hf_base_fields(text, MODEL_TYPE, rope=_mrope(text))
        fields["head_dim"] = text["hidden_size"] // text["num_attention_heads"]  # HF ignores a head_dim key here
        fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
        vision = VisionConfig.from_hf(hf.get("vision_config") or {})
        if vision.out_hidden_size != fields["hidden_size"]:
            raise ValueError(f"config.json: vision_config.out_hidden_size {vision.out_hidden_size} must equal the "
                             f"text hidden_size {fields['hidden_size']}")
        d = cls.__dataclass_fields__
        ids = {k: hf.get(k, text.get(k, d[k].default)) for k in ("image_token_id", "video_token_id",
                                                                  "vision_start_token_id", "vision_end_token_id")}
        return cls(**fields, qkv_bias=True, vision=vision, **ids)


# ---------------------------------------------------------------------------------------------------------------------
# Host-side inputs (numpy): everything that depends on image_grid_thw values.

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionInputs:
    """Static-shaped index arrays of one flat vision sequence of N patches (M = N / spatial_merge_size ** 2 merged
    tokens), in the window order the vision blocks run in; all int32.

    window_index [M]: merged token of window-order slot i (transformers' window_index, padding slots last).
    reverse_index [M]: its inverse (argsort), which puts merged features back in image order.
    positions [2, N]: (row, column) of each patch in its image, for the 2-D rotary embedding.
    window_segments [N]: 1..n = the attention window of each patch; 0 = padding.
    full_segments [N]: 1..n = the image frame of each patch (full-attention blocks); 0 = padding.
    """
    window_index: jax.Array
    reverse_index: jax.Array
    positions: jax.Array
    window_segments: jax.Array
    full_segments: jax.Array


# `hidden_states` keyword arguments of a per-row batch (`host_batch`) -> the VisionInputs field each one fills.
ROW_VISION_KEYS = {"vision_window_index": "window_index", "vision_reverse_index": "reverse_index",
                   "vision_positions": "positions", "vision_window_segments": "window_segments",
                   "vision_full_segments": "full_segments"}


def _vision_config(config) -> VisionConfig:
    return config.vision if isinstance(config, Qwen2_5_VLConfig) else config


def _grids(image_grid_thw) -> np.ndarray:
    try:
        grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    except jax.errors.TracerArrayConversionError:
        raise ValueError("image_grid_thw must be concrete host values, not traced; inside jit pass the precomputed "
                         "vision=vision_inputs(...) and positions=rope_index(...)[0]") from None
    if (grids < 1).any():
        raise ValueError(f"image_grid_thw rows must be positive (t, h, w); got {grids.tolist()}")
    return grids


def vision_inputs(image_grid_thw, config, num_patches: int | None = None) -> VisionInputs:
    """VisionInputs (numpy) for images of `image_grid_thw` [num_images, 3] (t, h, w in patches), whose patches are
    the rows of pixel_values in order. `config`: a Qwen2_5_VLConfig or its VisionConfig. `num_patches` pads the
    sequence to a fixed length (a multiple of spatial_merge_size ** 2) so that one compile serves every batch."""
    vc = _vision_config(config)
    m, unit = vc.spatial_merge_size, vc.spatial_merge_size ** 2
    ws = vc.window_size // m // vc.patch_size  # window side in merged tokens
    grids = _grids(image_grid_thw)
    index, rows, cols, win_seg, full_seg = [], [], [], [], []
    offset = windows = frames = 0
    for t, h, w in grids.tolist():
        if h % m or w % m:
            raise ValueError(f"image_grid_thw row {[t, h, w]}: h and w must be multiples of spatial_merge_size {m}")
        lh, lw = h // m, w // m
        tt, hh, ww = (a.reshape(-1) for a in np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij"))
        window = (tt * -(-lh // ws) + hh // ws) * -(-lw // ws) + ww // ws
        order = np.lexsort((ww % ws, hh % ws, window))  # windows row-major, tokens row-major within a window
        index.append(order + offset)
        seg = np.unique(window[order], return_inverse=True)[1].reshape(-1)
        win_seg.append(seg + windows + 1)
        full_seg.append(tt[order] + frames + 1)
        sub = np.arange(unit)
        rows.append((hh[order, None] * m + sub[None] // m).reshape(-1))
        cols.append((ww[order, None] * m + sub[None] % m).reshape(-1))
        offset, windows, frames = offset + t * lh * lw, windows + seg.max() + 1, frames + t
    n = offset * unit
    total = n if num_patches is None else num_patches
    if total < n or total % unit:
        raise ValueError(f"num_patches {total} must be a multiple of {unit} and at least the {n} patches of "
                         f"image_grid_thw")
    pad = total - n
    window_index = np.concatenate(index + [np.arange(offset, total // unit)])
    per_patch = lambda parts: np.concatenate(parts + [np.zeros(pad, np.int64)])  # noqa: E731
    i32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    return VisionInputs(i32(window_index), i32(np.argsort(window_index, kind="stable")),
                        i32(np.stack([per_patch(rows), per_patch(cols)])),
                        i32(np.repeat(np.concatenate(win_seg + [np.zeros(pad // unit, np.int64)]), unit)),
                        i32(np.repeat(np.concatenate(full_seg + [np.zeros(pad // unit, np.int64)]), unit)))


def rope_index(input_ids, image_grid_thw, attention_mask=None, config: Qwen2_5_VLConfig | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(M-RoPE positions [3, B, T] int32, rope deltas [B, 1] int32) as transformers' `get_rope_index` computes them.

    Per row, over its real tokens (attention_mask 1; padding keeps position 0): text tokens count up on all three
    components; each run of image_token_id takes the next image of `image_grid_thw` (row-major over the batch) and
    gets (start + frame, start + row, start + column) on its merged grid, after which text resumes at
    start + max(h, w) / spatial_merge_size. The delta is max position + 1 - real tokens: a decoded token's position
    is the row's largest position + 1 (+ step), which the KV cache continues from.
    """
    try:
        ids = np.asarray(input_ids)
        mask = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    except jax.errors.TracerArrayConversionError:
        raise ValueError("rope_index needs concrete host input_ids and attention_mask, not traced ones; inside jit "
                         "pass positions=rope_index(...)[0] computed beforehand") from None
    b, t = ids.shape
    mask = np.ones((b, t), bool) if mask is None else mask
    m, image = config.vision.spatial_merge_size, config.image_token_id
    grids = iter(_grids(image_grid_thw).tolist() if image_grid_thw is not None else [])
    positions, deltas = np.zeros((3, b, t), np.int64), np.zeros((b, 1), np.int64)
    for row in range(b):
        tokens = ids[row][mask[row]]
        chunks, start, i = [], 0, 0
        while i < len(tokens):
            if tokens[i] == image:
                grid = next(grids, None)
                if grid is None:
                    raise ValueError(f"input_ids row {row} has more images (runs of image_token_id {image}) than "
                                     f"image_grid_thw has rows")
                gt, gh, gw = grid
                coords = np.meshgrid(np.arange(gt), np.arange(gh // m), np.arange(gw // m), indexing="ij")
                n = coords[0].size
                if not (tokens[i:i + n] == image).all():
                    raise ValueError(f"input_ids row {row}: an image of grid {grid} needs {n} image tokens in a "
                                     f"row but has fewer")
                chunks.append(np.stack([c.reshape(-1) for c in coords]) + start)
                start += max(gh, gw) // m
                i += n
            else:
                j = i
                while j < len(tokens) and tokens[j] != image:
                    j += 1
                chunks.append(np.broadcast_to(np.arange(start, start + j - i), (3, j - i)))
                start += j - i
                i = j
        if chunks:
            llm = np.concatenate(chunks, axis=1)
            positions[:, row, mask[row]] = llm
            deltas[row, 0] = llm.max() + 1 - len(tokens)
    return positions.astype(np.int32), deltas.astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------------
# The vision tower.

class PatchProjection(nnx.Module):
    """The Conv3d patch embedding (stride = kernel, no bias) as one matmul. `kernel` is HF's weight [hidden, C, T, P,
    P] with every axis reversed ([P, P, T, C, hidden]: the `.T` the checkpoint table applies to every kernel)."""

    def __init__(self, vc: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        p = vc.patch_size
        self.axes = (None, None, None, None, "embed")
        self.dtype, self.hidden = dtype, vc.hidden_size
        self.kernel = nnx.Param(_init(rngs.params(), (p, p, vc.temporal_patch_size, vc.in_channels, vc.hidden_size),
                                      param_dtype, init_std))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels [N, C * T * P * P] (channel-major, as the image processor flattens them) -> [N, hidden]."""
        kernel = jnp.transpose(self.kernel[...], (3, 2, 1, 0, 4)).reshape(-1, self.hidden)
        return jnp.dot(pixels.astype(self.dtype), kernel.astype(self.dtype))


class PatchEmbed(nnx.Module):
    def __init__(self, vc: VisionConfig, **kw):
        self.proj = PatchProjection(vc, **kw)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.proj(pixels)


class VisionAttention(nnx.Module):
    """Non-causal attention within segments (windows or frames): fused `qkv` and `proj`, both with bias."""

    def __init__(self, vc: VisionConfig, *, impl: str, **kw):
        self.num_heads, self.head_dim, self.impl = vc.num_heads, vc.head_dim, impl
        self.qkv = Linear(vc.hidden_size, 3 * vc.hidden_size, use_bias=True, axes=("embed", "mlp"), **kw)
        self.proj = Linear(vc.hidden_size, vc.hidden_size, use_bias=True, axes=("mlp", "embed"), **kw)

    def __call__(self, x, positions, inv_freq, segment_ids, dropout_rng=None):
        """x [B, N, hidden]; positions [2, B, N]; inv_freq [2, head_dim / 2]; segment_ids [B, N] (per row)."""
        b, n, _ = x.shape
        qkv = self.qkv(x, dropout_rng).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = (apply_rope(a.astype(jnp.float32), positions, inv_freq).astype(a.dtype) for a in (q, k))
        out = bidirectional_attention(q, k, v, segment_ids, impl=self.impl)
        return self.proj(out.reshape(b, n, -1), dropout_rng)


class VisionMLP(nnx.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), every projection with bias."""

    def __init__(self, vc: VisionConfig, **kw):
        self.act = vc.hidden_act
        self.gate_proj = Linear(vc.hidden_size, vc.intermediate_size, use_bias=True, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(vc.hidden_size, vc.intermediate_size, use_bias=True, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(vc.intermediate_size, vc.hidden_size, use_bias=True, axes=("mlp", "embed"), **kw)

    def __call__(self, x, dropout_rng=None):
        h = ACTIVATIONS[self.act](self.gate_proj(x, dropout_rng)) * self.up_proj(x, dropout_rng)
        return self.down_proj(h, dropout_rng)


class VisionBlock(nnx.Module):
    def __init__(self, vc: VisionConfig, *, impl: str, dtype, param_dtype, rngs: nnx.Rngs, init_std: float):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=init_std)
        self.norm1 = RMSNorm(vc.hidden_size, eps=VISION_EPS, dtype=dtype, param_dtype=param_dtype)
        self.norm2 = RMSNorm(vc.hidden_size, eps=VISION_EPS, dtype=dtype, param_dtype=param_dtype)
        self.attn = VisionAttention(vc, impl=impl, **kw)
        self.mlp = VisionMLP(vc, **kw)

    def __call__(self, x, positions, inv_freq, segment_ids, dropout_rng=None):
        with jax.named_scope("attn"):
            x = x + self.attn(self.norm1(x), positions, inv_freq, segment_ids, dropout_rng)
        with jax.named_scope("mlp"):
            return x + self.mlp(self.norm2(x), dropout_rng)


class Gelu(nnx.Module):
    """The parameterless nn.GELU() between merger.mlp.0 and merger.mlp.2 (exact erf form)."""

    def __call__(self, x):
        return ACTIVATIONS["gelu"](x)


class PatchMerger(nnx.Module):
    """ln_q, then each spatial_merge_size ** 2 consecutive patches concatenated -> mlp.0 -> GELU -> mlp.2."""

    def __init__(self, vc: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, init_std: float):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=init_std)
        self.width = vc.hidden_size * vc.spatial_merge_size ** 2
        self.ln_q = RMSNorm(vc.hidden_size, eps=VISION_EPS, dtype=dtype, param_dtype=param_dtype)
        self.mlp = nnx.List([Linear(self.width, self.width, axes=("embed", "mlp"), **kw), Gelu(),
                             Linear(self.width, vc.out_hidden_size, axes=("mlp", "embed"), **kw)])

    def __call__(self, x, dropout_rng=None):
        """x [..., N, hidden] -> [..., N / merge ** 2, out_hidden_size]."""
        h = self.ln_q(x).reshape(*x.shape[:-2], -1, self.width)
        return self.mlp[2](self.mlp[1](self.mlp[0](h, dropout_rng)), dropout_rng)


class VisionTransformer(nnx.Module):
    """`visual`: patch_embed -> window permutation -> blocks (window attention, full attention on
    fullatt_block_indexes) -> merger -> back to image order."""

    def __init__(self, vc: VisionConfig, *, impl: str, remat: str, dtype, param_dtype, rngs: nnx.Rngs,
                 init_std: float):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=init_std)
        self.vc, self.remat = vc, remat
        self.patch_embed = PatchEmbed(vc, **kw)
        self.blocks = nnx.List([VisionBlock(vc, impl=impl, **kw) for _ in range(vc.depth)])
        self.merger = PatchMerger(vc, **kw)

    def rope_inv_freq(self) -> jax.Array:
        """[2, head_dim / 2]: row 0 rotates the first half of the frequencies by patch row, row 1 the second half
        by patch column (transformers' axial rope: the same head_dim / 4 frequencies for both)."""
        dim = self.vc.head_dim // 2
        inv = 1.0 / (jnp.float32(self.vc.rope_theta) ** (jnp.arange(0, dim, 2, dtype=jnp.int32).astype(jnp.float32)
                                                         / dim))
        zeros = jnp.zeros_like(inv)
        return jnp.stack([jnp.concatenate([inv, zeros]), jnp.concatenate([zeros, inv])])

    def __call__(self, pixel_values: jax.Array, vision: VisionInputs, dropout_rng=None) -> jax.Array:
        """pixel_values [N, patch_dim] -> merged features [N / merge ** 2, out_hidden_size] in image order; per row,
        pixel_values [B, N, patch_dim] with every `vision` array batched [B, ...] -> [B, N / merge ** 2,
        out_hidden_size] (rows attend only within themselves)."""
        if pixel_values.ndim == 2:
            return self(pixel_values[None], jax.tree.map(lambda a: jnp.asarray(a)[None], vision), dropout_rng)[0]
        unit = self.vc.spatial_merge_size ** 2
        with jax.named_scope("patch_embed"):
            x = self.patch_embed(pixel_values)
        b, n, d = x.shape
        window_index = jnp.asarray(vision.window_index)[:, :, None, None]
        x = jnp.take_along_axis(x.reshape(b, n // unit, unit, d), window_index, axis=1).reshape(b, n, d)
        positions, inv_freq = jnp.swapaxes(jnp.asarray(vision.positions), 0, 1), self.rope_inv_freq()
        full, windows = jnp.asarray(vision.full_segments), jnp.asarray(vision.window_segments)

        def run_block(block, x, segment_ids):
            return block(x, positions, inv_freq, segment_ids, dropout_rng)

        if self.remat != "none":
            run_block = nnx.remat(run_block, policy=remat_policy(self.remat))
        for i, block in enumerate(self.blocks):
            with jax.named_scope(f"blocks.{i}"):
                x = run_block(block, x, full if i in self.vc.fullatt_block_indexes else windows)
        with jax.named_scope("merger"):
            merged = self.merger(x, dropout_rng)
            return jnp.take_along_axis(merged, jnp.asarray(vision.reverse_index)[:, :, None], axis=1)


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array,
                         image_token_id: int) -> jax.Array:
    """embeds [B, T, hidden] with the k-th image token (row-major over the batch) replaced by features[k] of flat
    features [K, hidden]; with per-row features [B, K, hidden], row b's k-th image token takes features[b, k]. A
    gather and a select: no host sync; features beyond the image tokens, e.g. of padding patches, go unused."""
    is_image = input_ids == image_token_id
    if features.ndim == 3:
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
        gathered = jnp.take_along_axis(features, index[..., None], axis=1).astype(embeds.dtype)
        return jnp.where(is_image[..., None], gathered, embeds)
    index = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, features.shape[0] - 1)
    gathered = jnp.take(features, index, axis=0).reshape(embeds.shape).astype(embeds.dtype)
    return jnp.where(is_image[..., None], gathered, embeds)


def _continue_positions(cache: KVCache, num_tokens: int) -> jax.Array:
    """[B, T] positions of new tokens that follow each row's largest cached position (0.. on an empty cache)."""
    last = jnp.max(jnp.where(cache.segment_ids != 0, cache.positions, -1), axis=1)
    return (last + 1)[:, None] + jnp.arange(num_tokens, dtype=jnp.int32)[None]


@register(MODEL_TYPE)
class Qwen2_5_VLForConditionalGeneration(DecoderLM):
    """`visual` (the vision tower), `model` (the Qwen2 text decoder with M-RoPE) and `lm_head` unless tied.

    Training calls `hidden_states(input_ids, AttentionInputs(segment_ids, positions), **model_inputs)` then
    `logits(h)`, where model_inputs are `host_batch`'s keys other than input_ids, labels, segment_ids and positions.
    """
    config_class = Qwen2_5_VLConfig

    @staticmethod
    def host_batch(config: Qwen2_5_VLConfig, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A VLM collator batch (data.vlm.VLMCollator, qwen2_5_vl) -> the arrays of one training step, numpy only.

        Reads input_ids, labels, segment_ids [B, S], pixel_values [B, P, patch_dim], image_grid_thw [B, M, 3],
        image_mask [B, M] (and checks patch_mask [B, P] when present). Returns, every array with the batch axis B
        first (U = spatial_merge_size ** 2, P a multiple of U):
          input_ids, labels, segment_ids: int32 [B, S] as given;
          positions int32 [B, 3, S]: M-RoPE positions, `rope_index` of each row with its real grids and
            attention_mask segment_ids != 0 (transpose of rope_index's [3, B, S]; `hidden_states` moves the axis);
          pixel_values float32 [B, P, patch_dim] (each row's real patches first; padding patches are never used);
          vision_window_index, vision_reverse_index int32 [B, P / U]; vision_positions int32 [B, 2, P];
            vision_window_segments, vision_full_segments int32 [B, P]: `vision_inputs` of each row's real grids
            padded to P patches (VisionInputs' fields, stacked).
        Keys other than input_ids/labels/segment_ids/positions are `hidden_states` keyword arguments.
        Raises ValueError when a key is missing, the shapes disagree, or a row's image tokens, grids and patches do
        not match.
        """
        keys = ("input_ids", "labels", "segment_ids", "pixel_values", "image_grid_thw", "image_mask")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"Qwen2.5-VL batch lacks {missing}; expected the VLM collator's keys {list(keys)}")
        out = {k: np.asarray(batch[k], np.int32) for k in keys[:3]}
        pixels = np.asarray(batch["pixel_values"], np.float32)
        grids, real = np.asarray(batch["image_grid_thw"], np.int64), np.asarray(batch["image_mask"], bool)
        ids = out["input_ids"]
        (b, s), vc = ids.shape, config.vision
        unit = vc.spatial_merge_size ** 2
        if any(out[k].shape != (b, s) for k in keys[:3]) or pixels.ndim != 3 \
                or pixels.shape[::2] != (b, vc.patch_dim) or grids.shape != (*real.shape, 3) or real.shape[0] != b:
            raise ValueError(f"Qwen2.5-VL batch shapes disagree: input_ids {ids.shape}, pixel_values {pixels.shape}, "
                             f"image_grid_thw {grids.shape}, image_mask {real.shape}; expected [B, S], [B, P, "
                             f"{vc.patch_dim}], [B, M, 3], [B, M]")
        patch_mask = batch.get("patch_mask")
        attention = out["segment_ids"] != 0
        positions = np.zeros((b, 3, s), np.int32)
        rows = []
        for r in range(b):
            row_grids = grids[r][real[r]]
            patches = int(row_grids.prod(axis=1).sum())
            tokens = int((ids[r] == config.image_token_id).sum())
            if tokens * unit != patches:
                raise ValueError(f"batch row {r}: {tokens} image tokens (id {config.image_token_id}) but its "
                                 f"image_grid_thw {row_grids.tolist()} describes {patches // unit} image features")
            if patch_mask is not None and int(np.asarray(patch_mask[r]).sum()) != patches:
                raise ValueError(f"batch row {r}: patch_mask marks {int(np.asarray(patch_mask[r]).sum())} patches "
                                 f"but its image_grid_thw {row_grids.tolist()} has {patches}")
            positions[r] = rope_index(ids[r:r + 1], row_grids, attention[r:r + 1], config)[0][:, 0]
            rows.append(vision_inputs(row_grids, config, num_patches=pixels.shape[1]))
        out["positions"], out["pixel_values"] = positions, pixels
        for key, field in ROW_VISION_KEYS.items():
            out[key] = np.stack([getattr(v, field) for v in rows]).astype(np.int32)
        return out

    def __init__(self, config: Qwen2_5_VLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.visual = VisionTransformer(config.vision, impl=config.attention_impl, remat=config.remat, dtype=dtype,
                                        param_dtype=param_dtype, rngs=rngs, init_std=config.initializer_range)

    def vision_inputs(self, image_grid_thw, num_patches: int | None = None) -> VisionInputs:
        """`vision_inputs` for this model's config."""
        return vision_inputs(image_grid_thw, self.config, num_patches)

    def rope_index(self, input_ids, image_grid_thw, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """`rope_index` for this model's config."""
        return rope_index(input_ids, image_grid_thw, attention_mask, self.config)

    def image_features(self, pixel_values, vision: VisionInputs, dropout_rng=None) -> jax.Array:
        """Merged image features [N / merge ** 2, hidden] of pixel_values [N, patch_dim], in image order; per row,
        [B, N / merge ** 2, hidden] of pixel_values [B, N, patch_dim] with `vision` batched [B, ...]."""
        with jax.named_scope("visual"):
            return self.visual(jnp.asarray(pixel_values), vision, dropout_rng)

    def hidden_states(self, input_ids, inputs: AttentionInputs, cache: KVCache | None = None, *,
                      pixel_values=None, image_grid_thw=None, vision: VisionInputs | None = None,
                      vision_window_index=None, vision_reverse_index=None, vision_positions=None,
                      vision_window_segments=None, vision_full_segments=None):
        """Final hidden states [B, T, hidden]; with `cache`, (hidden states, cache with these tokens appended).

        Flat: `inputs.positions` M-RoPE positions [3, B, T] from `rope_index` (or [B, T] for text only); with
        `pixel_values` [N, patch_dim] (all images of the batch, in order), `vision` (from `vision_inputs`; computed
        here from concrete `image_grid_thw` when not given) drives the vision tower, and its features replace the
        image_token_id embeddings, row-major over the batch.

        Per row (`host_batch`'s layout, what training passes): pixel_values [B, P, patch_dim], the vision_* arrays
        [B, ...] (or `vision` batched so), and `inputs.positions` [B, 3, T] (batch axis first, moved to [3, B, T]
        here; [B, T] for text only). Each row runs the vision tower on its own patches and row b's k-th image token
        takes row b's k-th merged feature. Raises ValueError when the per-row vision arrays are missing or the
        positions are not [B, 3, T].
        """
        embeds = None
        if pixel_values is not None and jnp.ndim(pixel_values) == 3:
            row_arrays = dict(vision_window_index=vision_window_index, vision_reverse_index=vision_reverse_index,
                              vision_positions=vision_positions, vision_window_segments=vision_window_segments,
                              vision_full_segments=vision_full_segments)
            if vision is None:
                missing = [k for k, v in row_arrays.items() if v is None]
                if missing:
                    raise ValueError(f"per-row pixel_values [B, P, patch_dim] need the per-row vision arrays of "
                                     f"host_batch; missing {missing}")
                vision = VisionInputs(**{ROW_VISION_KEYS[k]: v for k, v in row_arrays.items()})
            positions = inputs.positions
            if positions.ndim == 3:
                if positions.shape[:2] != (input_ids.shape[0], 3):
                    raise ValueError(f"per-row batches carry M-RoPE positions [B, 3, T] = [{input_ids.shape[0]}, 3, "
                                     f"{input_ids.shape[1]}] (host_batch's layout); got {list(positions.shape)}")
                inputs = dataclasses.replace(inputs, positions=jnp.swapaxes(positions, 0, 1))
        if pixel_values is not None:
            if vision is None:
                if image_grid_thw is None:
                    raise ValueError("pixel_values need image_grid_thw or precomputed vision inputs")
                vision = self.vision_inputs(image_grid_thw, num_patches=pixel_values.shape[0])
            features = self.image_features(pixel_values, vision, inputs.dropout_rng)
            with jax.named_scope("language_model"):
                embeds = merge_image_features(self.model.embed(input_ids), input_ids, features,
                                              self.config.image_token_id)
        with jax.named_scope("language_model"):
            h, cache = self.model(input_ids, inputs, cache, inputs_embeds=embeds)
        return h if cache is None else (h, cache)

    def __call__(self, input_ids, attention_mask=None, *, pixel_values=None, image_grid_thw=None,
                 vision: VisionInputs | None = None, positions=None, segment_ids=None, right_padded: bool = False,
                 dropout_rng=None, cache: KVCache | None = None):
        """Logits [batch, seq, vocab] (with a KV `cache`: (logits, new cache)); numpy or jax inputs.

        Positions default to `rope_index` (on the host) when image_grid_thw is given; otherwise to 0..T-1 without a
        cache, and with one to each row's largest cached position + 1 onwards (HF's rope deltas when decoding).
        Images belong in the first call on a cache (rope_index numbers positions from 0).
        """
        if positions is None and image_grid_thw is not None:
            if pixel_values is not None:
                self._check_image_tokens(input_ids, image_grid_thw)
            positions = self.rope_index(input_ids, image_grid_thw, attention_mask)[0]
        elif positions is None and cache is not None:
            positions = _continue_positions(cache, np.shape(input_ids)[1])
        input_ids = jnp.asarray(input_ids)
        inputs = AttentionInputs.build(input_ids, None if attention_mask is None else jnp.asarray(attention_mask),
                                       positions=None if positions is None else jnp.asarray(positions),
                                       segment_ids=segment_ids, right_padded=right_padded and cache is None,
                                       dropout_rng=dropout_rng, cache_index=None if cache is None else cache.index)
        out = self.hidden_states(input_ids, inputs, cache, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                                 vision=vision)
        if cache is None:
            return self.logits(out)
        h, cache = out
        return self.logits(h), cache

    def _check_image_tokens(self, input_ids, image_grid_thw) -> None:
        try:
            tokens = int((np.asarray(input_ids) == self.config.image_token_id).sum())
        except jax.errors.TracerArrayConversionError:
            return
        features = int(_grids(image_grid_thw).prod(axis=1).sum()) // self.config.vision.spatial_merge_size ** 2
        if tokens != features:
            raise ValueError(f"input_ids have {tokens} image tokens but image_grid_thw describes {features} image "
                             f"features; they must match")
