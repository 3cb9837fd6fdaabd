"""Qwen2.5-VL's vision tower (`visual.*`): patch embedding, windowed blocks with 2-D rotary embeddings, the patch
merger, and the host-side index arrays (`vision_inputs`) that depend on image_grid_thw values, so that jitted code
sees only static-shaped arrays. The language side and the full model are in `qwen2_5_vl.py`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from automodel_jax.models.attention import bidirectional_attention
from automodel_jax.models.base import remat_policy
from automodel_jax.models.layers import ACTIVATIONS, Linear, RMSNorm, _init, apply_rope

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
    """The VisionConfig itself, or the one of a model config that holds it (`config.vision`)."""
    return getattr(config, "vision", config)


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
