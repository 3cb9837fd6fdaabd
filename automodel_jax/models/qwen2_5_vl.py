"""Qwen2.5-VL (`qwen2_5_vl`): a windowed vision transformer (`qwen2_5_vl_vision.py`) whose merged patch features replace the image placeholder
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

from automodel_jax.models.attention import AttentionInputs
from automodel_jax.models.base import register
from automodel_jax.models.decoder import DecoderConfig, DecoderLM, hf_base_fields
from automodel_jax.models.kvcache import KVCache
from automodel_jax.models.layers import RopeConfig
from automodel_jax.models.qwen2_5_vl_vision import (MODEL_TYPE, ROW_VISION_KEYS, VisionConfig, VisionInputs, VisionTransformer,
                                                    _grids, vision_inputs)

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
        """A VLM collator batch (data.vlm_batches.VLMCollator, qwen2_5_vl) -> the arrays of one training step, numpy only.

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
            return self.logits(out, dropout_rng)
        h, cache = out
        return self.logits(h, dropout_rng), cache

    def _check_image_tokens(self, input_ids, image_grid_thw) -> None:
        try:
            tokens = int((np.asarray(input_ids) == self.config.image_token_id).sum())
        except jax.errors.TracerArrayConversionError:
            return
        features = int(_grids(image_grid_thw).prod(axis=1).sum()) // self.config.vision.spatial_merge_size ** 2
        if tokens != features:
            raise ValueError(f"input_ids have {tokens} image tokens but image_grid_thw describes {features} image "
                             f"features; they must match")
