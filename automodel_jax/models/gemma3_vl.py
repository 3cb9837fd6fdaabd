"""Gemma 3 vision-language model (HF `gemma3`, Gemma3ForConditionalGeneration, e.g. gemma-3-4b-it).

A SigLIP tower encodes each image to patches; the projector average-pools them to `mm_tokens_per_image` soft tokens,
RMS-normalises and projects them to the text width; they replace the embeddings of the image placeholder tokens
(`image_token_index`) in the prompt, and the Gemma 3 text decoder runs on the result. With `token_type_ids` (1 =
image token), each run of consecutive image tokens attends bidirectionally within itself, as transformers does
whenever token_type_ids are passed (training and prefill alike).

Images come in one of two layouts: flat (pixel_values [num_images, C, H, W], every row's images in order, as
transformers takes them) or per row (pixel_values [B, max_images, C, H, W] with image_mask [B, max_images], the
training collator's layout, which `host_batch` prepares): then row b's j-th real image fills row b's j-th image-token
block, so every array keeps the batch axis first and shards over it.

Module names are those transformers 5 `save_pretrained` writes: `language_model.model.*`,
`language_model.lm_head.weight` (untied only), `vision_tower.{embeddings,encoder,post_layernorm}.*`,
`multi_modal_projector.{mm_input_projection_weight,mm_soft_emb_norm.weight}`; the loader also takes the runtime
layout (`model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`) and published checkpoints'
`vision_tower.vision_model.*` (checkpoint.hf.HF_KEY_ALIASES).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from automodel_jax.models.attention import AttentionInputs
from automodel_jax.models.base import CausalLM, register
from automodel_jax.models.gemma3 import Gemma3ForCausalLM, Gemma3TextConfig
from automodel_jax.models.kvcache import KVCache
from automodel_jax.models.layers import Linear, RMSNorm
from automodel_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel

# HF Gemma3TextConfig's defaults that published config.json files leave out of `text_config` (gemma-3-4b-it lists
# only hidden_size, intermediate_size, num_hidden_layers, rope_scaling and sliding_window).
TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072)


@dataclasses.dataclass(frozen=True)
class Gemma3Config(Gemma3TextConfig):
    """The text decoder's fields (flat, as Gemma3TextConfig, so code reading `config.vocab_size`, `config.rope` ...
    works unchanged), plus the vision tower and the image-token layout."""
    vision: SiglipVisionConfig = SiglipVisionConfig()
    mm_tokens_per_image: int = 256
    image_token_index: int = 262_144
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @classmethod
    def from_hf(cls, hf: dict) -> "Gemma3Config":
        """From a Gemma3Config config.json dict; `tie_word_embeddings` is the top-level one (transformers ties
        lm_head by it, not by text_config's), and text_config's final_logit_softcapping is ignored, as transformers'
        Gemma3ForConditionalGeneration ignores it (published configs set it null)."""
        text = Gemma3TextConfig.from_hf({**TEXT_DEFAULTS, **(hf.get("text_config") or {})})
        vision = SiglipVisionConfig.from_hf(hf.get("vision_config") or {}, "config.json: vision_config")
        tokens = hf.get("mm_tokens_per_image", 256)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"config.json: mm_tokens_per_image {tokens} is not a square number")
        if vision.patches_per_side % side:
            raise ValueError(f"config.json: mm_tokens_per_image {tokens} ({side} per side) does not evenly pool the "
                             f"{vision.patches_per_side}x{vision.patches_per_side} patches of vision_config "
                             f"(image_size / patch_size)")
        fields = {f.name: getattr(text, f.name) for f in dataclasses.fields(text)}
        fields.update(tie_word_embeddings=hf.get("tie_word_embeddings", True), final_logit_softcap=None, vision=vision,
                      mm_tokens_per_image=tokens,
                      image_token_index=hf.get("image_token_index", hf.get("image_token_id", 262_144)),
                      boi_token_index=hf.get("boi_token_index", 255_999),
                      eoi_token_index=hf.get("eoi_token_index", 256_000))
        return cls(**fields)


def image_block_ids(token_type_ids: jax.Array) -> jax.Array:
    """AttentionInputs.bidirectional_ids from token_type_ids [B, T] (1 = image token): 0 for other tokens, k for the
    k-th run of consecutive image tokens in its row (transformers' block_sequence_ids + 1). int32 [B, T]."""
    is_image = jnp.asarray(token_type_ids) == 1
    starts = is_image & ~jnp.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(is_image, jnp.cumsum(starts, axis=1), 0).astype(jnp.int32)


def _row_image_slots(is_image: jax.Array, tokens_per_image: int, num_images: int,
                     image_mask: jax.Array | None) -> jax.Array:
    """Per-row image layout: for each token of is_image [B, T], the index into its row's features [B, num_images *
    tokens_per_image, hidden] that it takes (meaningful on image tokens only). Image token k of row b is token k %
    tokens_per_image of row b's (k // tokens_per_image)-th real image: the True entries of image_mask [B, num_images]
    in order (None = all images real). int32 [B, T]."""
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, num_images * tokens_per_image - 1)
    image = slot // tokens_per_image
    if image_mask is not None:  # stable: real images first, in their order
        order = jnp.argsort(~jnp.asarray(image_mask, bool), axis=1, stable=True)
        image = jnp.take_along_axis(order, image, axis=1)
    return (image * tokens_per_image + slot % tokens_per_image).astype(jnp.int32)


class Gemma3MultiModalProjector(nnx.Module):
    """Vision patches [N, patches, vision_hidden] -> soft tokens [N, mm_tokens_per_image, text_hidden]: average-pool
    the patch grid to tokens_per_side^2, Gemma RMSNorm (1 + weight), then x @ mm_input_projection_weight [vision_hidden,
    text_hidden] (a Linear, so LoRA can target it; HF stores the bare [in, out] parameter)."""

    def __init__(self, config: Gemma3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        vision = config.vision
        self.patches_per_side, self.tokens_per_side, self.dtype = vision.patches_per_side, config.tokens_per_side, dtype
        self.mm_input_projection_weight = Linear(vision.hidden_size, config.hidden_size, use_bias=False,
                                                 axes=("embed", None), dtype=dtype, param_dtype=param_dtype,
                                                 rngs=rngs, init_std=config.initializer_range)
        self.mm_soft_emb_norm = RMSNorm(vision.hidden_size, eps=vision.layer_norm_eps, dtype=dtype,
                                        param_dtype=param_dtype, offset=1.0)

    def __call__(self, vision_outputs: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        n, _, d = vision_outputs.shape
        side, k = self.tokens_per_side, self.patches_per_side // self.tokens_per_side
        grid = vision_outputs.astype(jnp.float32).reshape(n, side, k, side, k, d)
        pooled = jnp.mean(grid, axis=(2, 4)).reshape(n, side * side, d).astype(self.dtype)
        return self.mm_input_projection_weight(self.mm_soft_emb_norm(pooled), dropout_rng)


@register("gemma3")
class Gemma3ForConditionalGeneration(CausalLM):
    """`vision_tower` (SigLIP), `multi_modal_projector`, `language_model` (a Gemma3ForCausalLM: `model`, `lm_head`).

    Training calls `hidden_states(input_ids, inputs, **model_inputs)` then `logits(h)` (or a fused loss with
    `output_head(h)` and `logit_softcap`) like any CausalLM, where model_inputs are `host_batch`'s keys other than
    input_ids, labels, segment_ids and positions (those build `inputs`)."""
    config_class = Gemma3Config

    @staticmethod
    def host_batch(config: Gemma3Config, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A VLM collator batch (data.vlm_batches.VLMCollator, gemma3) -> the arrays of one training step, numpy only.

        Returns, every array with the batch axis B first:
          input_ids, labels, segment_ids, positions: int32 [B, S] as given (positions restart per row);
          token_type_ids int32 [B, S] (1 = image token: bidirectional attention within each image);
          pixel_values float32 [B, M, C, H, W] (M = max_images; images beyond a row's real ones are ignored);
          image_mask bool [B, M] (True = real image, in the order of the row's image-token blocks).
        Keys other than input_ids/labels/segment_ids/positions are `hidden_states` keyword arguments.
        Raises ValueError when a key is missing, the shapes disagree, or a row's image tokens are not
        mm_tokens_per_image per real image.
        """
        keys = ("input_ids", "labels", "segment_ids", "positions", "token_type_ids", "pixel_values", "image_mask")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"Gemma 3 batch lacks {missing}; expected the VLM collator's keys {list(keys)}")
        out = {k: np.asarray(batch[k], np.int32) for k in keys[:5]}
        out["pixel_values"] = np.asarray(batch["pixel_values"], np.float32)
        out["image_mask"] = np.asarray(batch["image_mask"], bool)
        b, s = out["input_ids"].shape
        pixels, mask = out["pixel_values"], out["image_mask"]
        if any(out[k].shape != (b, s) for k in keys[:5]) or pixels.ndim != 5 or pixels.shape[0] != b \
                or mask.shape != pixels.shape[:2]:
            raise ValueError(f"Gemma 3 batch shapes disagree: {({k: v.shape for k, v in out.items()})}; expected "
                             f"[B, S] token arrays, pixel_values [B, M, C, H, W] and image_mask [B, M]")
        tokens = (out["input_ids"] == config.image_token_index).sum(axis=1)
        expected = mask.sum(axis=1) * config.mm_tokens_per_image
        bad = np.flatnonzero(tokens != expected)
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"batch row {r}: {tokens[r]} image tokens (id {config.image_token_index}) but "
                             f"{mask[r].sum()} real images x {config.mm_tokens_per_image} tokens")
        return out

    def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vision_tower = SiglipVisionModel(config.vision, attention_impl=config.attention_impl,
                                              remat=config.remat, **kw)
        self.multi_modal_projector = Gemma3MultiModalProjector(config, **kw)
        self.language_model = Gemma3ForCausalLM(config, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 pixel_values: jax.Array | None = None, token_type_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 right_padded: bool = False, dropout_rng: jax.Array | None = None, cache: KVCache | None = None,
                 image_mask: jax.Array | None = None):
        """Logits [batch, seq, vocab] (float), as CausalLM's call plus the images.

        pixel_values [num_images, channels, image_size, image_size] (every row's images in order: the k-th image
        fills the k-th run of mm_tokens_per_image image tokens, counted row-major), or per row [batch, M, channels,
        image_size, image_size] with image_mask [batch, M] (see `hidden_states`); token_type_ids [batch, seq]
        (1 = image token) turn on bidirectional attention within each image. With a KV `cache`, returns
        (logits, cache); images belong in the prefill call.
        """
        input_ids = jnp.asarray(input_ids)
        inputs = AttentionInputs.build(input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                                       right_padded=right_padded and cache is None, dropout_rng=dropout_rng,
                                       cache_index=None if cache is None else cache.index)
        out = self.hidden_states(input_ids, inputs, cache, pixel_values=pixel_values, token_type_ids=token_type_ids,
                                 image_mask=image_mask)
        if cache is None:
            return self.logits(out, dropout_rng)
        h, cache = out
        return self.logits(h, dropout_rng), cache

    def image_features(self, pixel_values: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """pixel_values [num_images, channels, H, W] -> soft tokens [num_images, mm_tokens_per_image, hidden]; per
        row, [B, M, channels, H, W] -> [B, M, mm_tokens_per_image, hidden] (the tower runs on all B * M images)."""
        if pixel_values.ndim == 5:
            b, m = pixel_values.shape[:2]
            features = self.image_features(pixel_values.reshape(b * m, *pixel_values.shape[2:]), dropout_rng)
            return features.reshape(b, m, *features.shape[1:])
        with jax.named_scope("vision_tower"):
            patches = self.vision_tower(pixel_values, dropout_rng)
        with jax.named_scope("multi_modal_projector"):
            return self.multi_modal_projector(patches, dropout_rng)

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              dropout_rng: jax.Array | None = None, image_mask: jax.Array | None = None) -> jax.Array:
        """Scaled token embeddings [B, T, hidden] with the image features written over the image tokens, in order.

        A static-shape scatter. Flat pixel_values [N, C, H, W]: image token number k (row-major over the batch) takes
        feature row k of all images' tokens. Per row, pixel_values [B, M, C, H, W] with image_mask [B, M] (None =
        all real): row b's j-th run of image tokens takes row b's j-th real image (see `_row_image_slots`).
        """
        cfg = self.config
        is_image = input_ids == cfg.image_token_index
        if cfg.image_token_index >= cfg.vocab_size:  # out of vocabulary: embed a valid id, overwritten below
            input_ids = jnp.where(is_image, 0, input_ids)
        with jax.named_scope("language_model"):
            x = self.language_model.model.embed(input_ids)
        if pixel_values is None:
            return x
        pixel_values = jnp.asarray(pixel_values)
        per_row = pixel_values.ndim == 5
        if not isinstance(is_image, jax.core.Tracer):  # outside jit: HF's count check, without a host sync inside
            if per_row:
                real = (np.full(pixel_values.shape[:2], True) if image_mask is None
                        else np.asarray(image_mask, bool))
                n_tokens, n_images = np.asarray(is_image).sum(axis=1), real.sum(axis=1)
            else:
                n_tokens, n_images = np.asarray([int(jnp.sum(is_image))]), np.asarray([pixel_values.shape[0]])
            bad = np.flatnonzero(n_tokens != n_images * cfg.mm_tokens_per_image)
            if bad.size:
                r = int(bad[0])
                raise ValueError(f"image features and image tokens do not match: {n_tokens[r]} image tokens (id "
                                 f"{cfg.image_token_index}){f' in row {r}' if per_row else ''} but {n_images[r]} "
                                 f"images x {cfg.mm_tokens_per_image} tokens")
        features = self.image_features(pixel_values, dropout_rng).astype(x.dtype)
        if per_row:
            b, m, k, d = features.shape
            slot = _row_image_slots(is_image, k, m, image_mask)
            gathered = jnp.take_along_axis(features.reshape(b, m * k, d), slot[..., None], axis=1)
            return jnp.where(is_image[..., None], gathered, x)
        features = features.reshape(-1, features.shape[-1])
        slot = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, features.shape[0] - 1)
        return jnp.where(is_image[..., None], jnp.take(features, slot, axis=0).reshape(x.shape), x)

    def hidden_states(self, input_ids, inputs: AttentionInputs, cache: KVCache | None = None, *,
                      pixel_values: jax.Array | None = None, token_type_ids: jax.Array | None = None,
                      image_mask: jax.Array | None = None):
        """Final hidden states [B, T, hidden]; with `cache`, (hidden states, cache with these tokens appended).

        input_ids [B, T] int (image placeholders included); `inputs` as for any CausalLM, positions [B, T] (its
        bidirectional_ids are set from `token_type_ids` [B, T] when given, see `image_block_ids`). pixel_values
        flat [num_images, C, H, W] (row-major over the batch), or per row [B, M, C, H, W] with image_mask bool
        [B, M] (True = real image; `host_batch`'s layout), where padded images are encoded but never used.
        """
        input_ids = jnp.asarray(input_ids)
        if token_type_ids is not None:
            inputs = dataclasses.replace(inputs, bidirectional_ids=image_block_ids(token_type_ids))
        x = self.embed(input_ids, pixel_values, inputs.dropout_rng, image_mask)
        with jax.named_scope("language_model"), jax.named_scope("model"):
            h, cache = self.language_model.model(input_ids, inputs, cache, inputs_embeds=x)
        return h if cache is None else (h, cache)

    def output_head(self, h: jax.Array, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The language model's `output_head` (see CausalLM.output_head)."""
        return self.language_model.output_head(h, dropout_rng)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (dtype default: the compute dtype)."""
        return self.language_model.init_cache(batch, max_len, dtype)
