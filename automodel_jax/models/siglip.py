"""SigLIP vision tower (HF `siglip_vision_model`, the image encoder of Gemma 3), with HF's module names.

`embeddings` (patch_embedding: a conv with kernel = stride = patch, position_embedding), `encoder.layers.N`
(layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2; pre-norm, non-causal attention) and
`post_layernorm`. The attention-pooling head (`vision_use_head`) is not built: Gemma 3 never uses it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from automodel_jax.models.attention import bidirectional_attention
from automodel_jax.models.base import remat_policy
from automodel_jax.models.layers import ACTIVATIONS, Embedding, LayerNorm, Linear, _init


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """The vision tower's architecture; the defaults are HF SiglipVisionConfig's (config.json may leave them out)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "SiglipVisionConfig":
        """From an HF vision config dict (e.g. Gemma 3's `vision_config`), validated with one-line errors that name
        `where` (e.g. "config.json: vision_config")."""
        defaults = cls()
        get = lambda key: hf.get(key, getattr(defaults, key))  # noqa: E731
        if hf.get("model_type", "siglip_vision_model") != "siglip_vision_model":
            raise ValueError(f"{where}: model_type {hf['model_type']!r} is not supported; supported: "
                             f"'siglip_vision_model'")
        if hf.get("vision_use_head", True):  # HF's default builds the head
            raise ValueError(f"{where}: vision_use_head true is not supported (SigLIP's attention-pooling head is "
                             f"not built; Gemma 3 never uses it and its checkpoints set it false)")
        sizes = {}
        for key in ("image_size", "patch_size"):
            value = get(key)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise ValueError(f"{where}: {key} {list(value)} is not supported; only square sizes are")
                value = value[0]
            sizes[key] = int(value)
        if sizes["image_size"] % sizes["patch_size"]:
            raise ValueError(f"{where}: image_size {sizes['image_size']} is not a multiple of patch_size "
                             f"{sizes['patch_size']}")
        if get("hidden_size") % get("num_attention_heads"):
            raise ValueError(f"{where}: hidden_size {get('hidden_size')} is not a multiple of num_attention_heads "
                             f"{get('num_attention_heads')}")
        if get("hidden_act") not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {get('hidden_act')!r} is not supported; supported: "
                             f"{tuple(ACTIVATIONS)}")
        return cls(hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                   num_hidden_layers=get("num_hidden_layers"), num_attention_heads=get("num_attention_heads"),
                   num_channels=get("num_channels"), hidden_act=get("hidden_act"),
                   layer_norm_eps=get("layer_norm_eps"), initializer_range=hf.get("initializer_range", 0.02),
                   **sizes)


class SiglipPatchEmbedding(nnx.Module):
    """HF's Conv2d(num_channels, hidden, kernel_size = stride = patch): one Linear per non-overlapping patch.

    `kernel` is kept in HF's layout [hidden, channels, patch, patch] (exported as `weight` untransposed), `bias`
    [hidden]."""

    def __init__(self, channels: int, features: int, patch: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.axes = ("embed", None, None, None)
        self.patch, self.dtype = patch, dtype
        self.kernel = nnx.Param(_init(rngs.params(), (features, channels, patch, patch), param_dtype, init_std))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, channels, H, W] -> patch embeddings [N, (H/patch) * (W/patch), hidden], row-major."""
        n, c, h, w = pixel_values.shape
        p = self.patch
        x = jnp.asarray(pixel_values).astype(self.dtype).reshape(n, c, h // p, p, w // p, p)
        y = jnp.einsum("ncipjq,ocpq->nijo", x, self.kernel[...].astype(self.dtype))
        return y.reshape(n, (h // p) * (w // p), -1) + self.bias[...].astype(self.dtype)


class SiglipVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.image_size = cfg.image_size
        self.patch_embedding = SiglipPatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size, dtype=dtype,
                                                    param_dtype=param_dtype, rngs=rngs,
                                                    init_std=cfg.initializer_range)
        self.position_embedding = Embedding(cfg.patches_per_side ** 2, cfg.hidden_size, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, channels, image_size, image_size] -> [N, patches, hidden] with position embeddings."""
        if tuple(pixel_values.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values of shape {list(pixel_values.shape)}: images must be "
                             f"{self.image_size}x{self.image_size} ([num_images, channels, image_size, image_size])")
        x = self.patch_embedding(pixel_values)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class SiglipAttention(nnx.Module):
    """Non-causal multi-head attention over an image's patches: q/k/v/out_proj with biases."""

    def __init__(self, cfg: SiglipVisionConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim, self.impl = cfg.num_attention_heads, cfg.head_dim, attention_impl
        h = cfg.hidden_size
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)
        self.q_proj = Linear(h, h, axes=("embed", "vision_heads"), **kw)
        self.k_proj = Linear(h, h, axes=("embed", "vision_heads"), **kw)
        self.v_proj = Linear(h, h, axes=("embed", "vision_heads"), **kw)
        self.out_proj = Linear(h, h, axes=("vision_heads", "embed"), **kw)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x [N, P, hidden] -> [N, P, hidden]."""
        n, p, _ = x.shape
        q, k, v = (proj(x, dropout_rng).reshape(n, p, self.num_heads, self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = bidirectional_attention(q, k, v, scale=self.head_dim ** -0.5, impl=self.impl)
        return self.out_proj(out.reshape(n, p, -1), dropout_rng)


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)
        self.activation = cfg.hidden_act
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x, dropout_rng)), dropout_rng)


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **norm)
        self.self_attn = SiglipAttention(cfg, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = SiglipMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        with jax.named_scope("self_attn"):
            x = x + self.self_attn(self.layer_norm1(x), dropout_rng)
        with jax.named_scope("mlp"):
            return x + self.mlp(self.layer_norm2(x), dropout_rng)


class SiglipEncoder(nnx.Module):
    def __init__(self, cfg: SiglipVisionConfig, *, attention_impl: str, remat: str, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.remat = remat
        self.layers = nnx.List([SiglipEncoderLayer(cfg, attention_impl=attention_impl, dtype=dtype,
                                                   param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        def run_layer(layer, x, dropout_rng):
            return layer(x, dropout_rng)

        if self.remat != "none":
            run_layer = nnx.remat(run_layer, policy=remat_policy(self.remat))
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layers.{i}"):
                x = run_layer(layer, x, dropout_rng)
        return x


class SiglipVisionModel(nnx.Module):
    """The tower: pixel_values [N, channels, image_size, image_size] -> last hidden state [N, patches, hidden]
    (after post_layernorm), as HF's SiglipVisionModel(...).last_hidden_state."""

    def __init__(self, cfg: SiglipVisionConfig, *, attention_impl: str = "auto", remat: str = "none",
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.cfg = cfg
        self.embeddings = SiglipVisionEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = SiglipEncoder(cfg, attention_impl=attention_impl, remat=remat, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype,
                                        param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        with jax.named_scope("embeddings"):
            x = self.embeddings(jnp.asarray(pixel_values))
        with jax.named_scope("encoder"):
            x = self.encoder(x, dropout_rng)
        with jax.named_scope("post_layernorm"):
            return self.post_layernorm(x)
