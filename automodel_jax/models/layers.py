"""Layers shared by every model family: Linear (with an optional LoRA adapter), Embedding, RMSNorm, rotary embedding.

Parameter leaf names are the Flax ones (`kernel` [in, out], `bias`, `embedding` [vocab, hidden], `scale`); each layer
records the logical axis names of its parameters in `axes`, which `automodel_jax.parallel.sharding` maps to mesh axes.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


# Marks an attribute as pytree data even while it holds None (flax >= 0.12 needs it; older flax has no such marker).
as_data = getattr(nnx, "data", lambda value: value)


class LoRAParam(nnx.Param):
    """An adapter weight: split from the frozen base parameters by this type (`nnx.split(model, LoRAParam, ...)`)."""


def _init(key, shape, dtype, std):
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out]; plus (dropout(x) @ lora_a @ lora_b) * lora_scale when adapted."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple[str, str],
                 dtype, param_dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        self.in_features, self.out_features, self.axes = in_features, out_features, axes
        self.dtype = dtype
        self.kernel = nnx.Param(_init(rngs.params(), (in_features, out_features), param_dtype, init_std))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.lora_a, self.lora_b = as_data(None), as_data(None)
        self.lora_scale, self.lora_dropout, self.lora_salt = 0.0, 0.0, 0

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            h = x
            if self.lora_dropout > 0.0 and dropout_rng is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, self.lora_salt),
                                            1.0 - self.lora_dropout, x.shape)
                h = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(self.dtype)
            h = jnp.dot(h, self.lora_a[...].astype(self.dtype))
            y = y + jnp.dot(h, self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        return y


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.axes = ("vocab", "embed")
        self.dtype = dtype
        self.embedding = nnx.Param(_init(rngs.params(), (num_embeddings, features), param_dtype, init_std))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: x @ embedding.T."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """HF RMSNorm: normalise in float32. offset=1 is Gemma's (1 + weight) form, which multiplies before the cast."""

    def __init__(self, features: int, *, eps: float, dtype, param_dtype, offset: float = 0.0):
        self.axes = ("norm",)
        self.eps, self.offset, self.dtype = eps, offset, dtype
        self.scale = nnx.Param(jnp.full((features,), 1.0 - offset, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(self.dtype)
        return (self.scale[...] * normed.astype(in_dtype)).astype(self.dtype)


ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from HF's `rope_theta`/`rope_scaling` or `rope_parameters`."""
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048

    @classmethod
    def from_hf(cls, hf: dict) -> "RopeConfig":
        params = dict(hf.get("rope_parameters") or {})
        scaling = dict(hf.get("rope_scaling") or {})
        params.update(scaling)
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"config.json: rope scaling type {kind!r} is not supported; supported: {ROPE_TYPES}")
        max_pos = hf.get("max_position_embeddings", 2048)
        return cls(theta=float(theta), type=kind, factor=float(params.get("factor", 1.0)),
                   low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=params.get("original_max_position_embeddings"),
                   max_position_embeddings=max_pos)

    def inv_freq(self, head_dim: int, seq_len: int) -> jax.Array:
        """Inverse frequencies [head_dim/2] as HF computes them for this rope type (float32)."""
        base = self.theta
        if self.type == "dynamic" and seq_len > self.max_position_embeddings:
            ratio = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            base = base * ratio ** (head_dim / (head_dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim))
        if self.type == "linear":
            inv = inv / self.factor
        elif self.type == "llama3":
            old_len = self.original_max_position_embeddings
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = jnp.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = jnp.where(medium, smoothed, scaled)
        return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF's non-interleaved rotary embedding. x [B, T, heads, D], positions [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
