"""Layers shared by every model family: Linear (with an optional LoRA adapter), Embedding, RMSNorm, rotary embedding,
the gated MLP.

Parameter leaf names are the Flax ones (`kernel` [in, out], `bias`, `embedding` [vocab, hidden], `scale`); each layer
records the logical axis names of its parameters in `axes`, which `automodel_jax.parallel.sharding` maps to mesh axes.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from automodel_jax.models.fp8 import fp8_dot, fp8_dot_delayed, new_amax_history
from automodel_jax.models.params import layer_paths, module_matches, path_str, pure_dict, stacked_at
from automodel_jax.parallel.sharding import constrain, tensor_parallel


# checkpoint_name of every Linear's output (after its bias and adapter).
LINEAR_OUT = "linear_out"

# Marks an attribute as pytree data even while it holds None (flax >= 0.12 needs it; older flax has no such marker).
as_data = getattr(nnx, "data", lambda value: value)


class LoRAParam(nnx.Param):
    """An adapter weight: split from the frozen base parameters by this type (`nnx.split(model, LoRAParam, ...)`)."""


class AmaxHistory(nnx.Variable):
    """Delayed FP8 scaling state of one Linear: float32 [3, amax_history_len] (`models.fp8.AMAX_ROWS`). Not a
    parameter: the train step carries it as state["fp8"] and writes back what `fp8_dot_delayed` returns as its
    gradient; never exported."""


def _init(key, shape, dtype, std):
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out]; plus (dropout(x) @ lora_a @ lora_b) * lora_scale when adapted.
    With `fp8` (set by `apply_fp8`) x @ kernel is an FP8 matmul, with tensorwise scaling (`models.fp8.fp8_dot`), or
    with delayed scaling from `amax_history` when it holds one (`fp8_dot_delayed`); the adapter stays in the compute
    dtype."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple[str, str],
                 dtype, param_dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        self.in_features, self.out_features, self.axes = in_features, out_features, axes
        self.dtype = dtype
        self.kernel = nnx.Param(_init(rngs.params(), (in_features, out_features), param_dtype, init_std))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.lora_a, self.lora_b = as_data(None), as_data(None)
        self.lora_scale, self.lora_dropout, self.lora_salt = 0.0, 0.0, 0
        self.fp8 = False
        self.amax_history = as_data(None)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.amax_history is not None:
            y = fp8_dot_delayed(x, kernel, self.amax_history[...])
        else:
            y = (fp8_dot if self.fp8 else jnp.dot)(x, kernel)
        return self.add_bias_and_adapter(y, x, dropout_rng)

    def add_bias_and_adapter(self, y: jax.Array, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """y [..., out] = x @ kernel (computed by the caller) plus the bias and the LoRA adapter's output on x [..., in]
        (both in the compute dtype)."""
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            h = self.lora_input(x, dropout_rng)
            y = y + jnp.dot(h, self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        # Named so that a checkpoint policy can keep the sum rather than its terms (`base.scan_save_policy`).
        return checkpoint_name(y, LINEAR_OUT)

    def lora_input(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """dropout(x) @ lora_a [..., r] in the compute dtype: the adapter's path before lora_b and the scale (PEFT's
        lora_A(dropout(x))); dropout only with a `dropout_rng`."""
        h = x.astype(self.dtype)
        if self.lora_dropout > 0.0 and dropout_rng is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, self.lora_salt),
                                        1.0 - self.lora_dropout, x.shape)
            h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(self.dtype)
        return jnp.dot(h, self.lora_a[...].astype(self.dtype))

    def matmul_operands(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(x' [..., in'], kernel' [in', out]) whose product x' @ kernel' is this bias-free layer's output, for callers
        that fuse the matmul with what follows (the lm_head into the loss): x (compute dtype) and the kernel, or with
        an adapter x' = [x, scale * dropout(x) @ lora_a] and kernel' = [kernel; lora_b] (in' = in + r), so that
        gradients reach lora_a through x' and lora_b through kernel'. Raises ValueError for a layer with a bias or with
        FP8 matmuls."""
        if self.bias is not None or self.fp8:
            raise ValueError("matmul_operands: the layer has a bias or FP8 matmuls; call the layer instead")
        x = x.astype(self.dtype)
        kernel = self.kernel[...]
        if self.lora_a is None:
            return x, kernel
        h = self.lora_input(x, dropout_rng) * jnp.asarray(self.lora_scale, self.dtype)
        return (jnp.concatenate([x, h], axis=-1),
                jnp.concatenate([kernel, self.lora_b[...].astype(kernel.dtype)], axis=0))


def apply_linears(x: jax.Array, layers: Sequence[Linear], dropout_rng: jax.Array | None = None) -> list[jax.Array]:
    """The outputs [..., out_i] of Linear `layers` that all read x [..., in] (q/k/v, gate/up).

    When every layer has tensorwise FP8 matmuls (and the kernels are not split over `tensor`), their base matmuls are
    one FP8 GEMM over the kernels concatenated along out, split back, with one scale for the concatenated kernel and one
    for the concatenated output gradient, as Transformer Engine scales a fused QKV projection: x is quantized once,
    and the narrow k/v GEMMs (H200, 8B shape: 0.95x bf16 on their own, BENCHMARKS.md) run inside a wide one. Bias
    and adapters stay per layer. Otherwise each layer's own call."""
    if len(layers) < 2 or tensor_parallel() or not all(
            isinstance(l, Linear) and l.fp8 and l.amax_history is None for l in layers):
        return [layer(x, dropout_rng) for layer in layers]
    x = x.astype(layers[0].dtype)
    kernel = jnp.concatenate([layer.kernel[...].astype(layer.dtype) for layer in layers], axis=1)
    splits = list(itertools.accumulate(layer.out_features for layer in layers))[:-1]
    return [layer.add_bias_and_adapter(y, x, dropout_rng)
            for layer, y in zip(layers, jnp.split(fp8_dot(x, kernel), splits, axis=-1))]


OUTPUT_LAYERS = ("lm_head",)


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
    """{module path: layer} of every Linear in `model`."""
    return {path_str(p): node for p, node in nnx.iter_graph(model) if isinstance(node, Linear)}


def layer_names(name: str, layer: Linear) -> list[str]:
    """The per-layer module names (HF's) that module `name` stands for: [name], or for a Linear of scanned layers
    (kernel [L, in, out], `model.layers.self_attn.q_proj`) `model.layers.{i}.self_attn.q_proj` for each layer i."""
    return layer_paths(name, layer.kernel.shape[0]) if stacked_at(name) is not None else [name]


def patterns_select(name: str, layer: Linear, patterns, key: str) -> bool:
    """Whether module patterns `patterns` (the config key `key` holds them) select the Linear at `name`, judged on its
    per-layer names (`layer_names`). A scanned module is one module for all layers, so patterns that select only some
    of its layers (one naming a layer index) are a ValueError naming the pattern and the fix."""
    names = layer_names(name, layer)
    hits = [n for n in names if any(module_matches(n, p) for p in patterns)]
    if hits and len(hits) < len(names):
        pattern = next(p for p in patterns if any(module_matches(n, p) for n in names))
        raise ValueError(f"{key} pattern {pattern!r} selects only some layers of the scanned module {name}, but "
                         f"scanned layers (model.scan_layers=true) take every layer or none; set "
                         f"model.scan_layers=false, or use a pattern without a layer index")
    return bool(hits)


def apply_fp8(model: nnx.Module, filter_modules: tuple[str, ...] = (), amax_history_len: int | None = None
              ) -> list[str]:
    """Turn on FP8 matmuls (in place) in every Linear of `model` but the output layer (`lm_head`, which stays in the
    compute dtype with the loss) and those matching a `filter_modules` pattern (NeMo Automodel's filter: globs on
    module names/paths or "re:<regex>" on full paths, see `params.module_matches`); returns the FP8 module paths.
    `amax_history_len`: None for tensorwise scaling, else delayed scaling with a zero `AmaxHistory` [3, L] in each FP8
    layer ([num_layers, 3, L] in scanned layers, where patterns must select every layer or none: `patterns_select`).
    Raises ValueError naming a pattern that matches no Linear layer nor `lm_head` (a typo would otherwise keep nothing
    in bf16)."""
    linears = linear_modules(model)
    key = "model.fp8.filter_modules"
    per_layer = [n for name, layer in linears.items() for n in layer_names(name, layer)]
    for pattern in filter_modules:
        if not any(module_matches(name, pattern) for name in [*per_layer, *OUTPUT_LAYERS]):
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"model.fp8.filter_modules pattern {pattern!r} matches no Linear layer; layer names "
                             f"are {names}, full paths look like {per_layer[0]!r}")
    chosen = [name for name, layer in linears.items() if name.rsplit(".", 1)[-1] not in OUTPUT_LAYERS
              and not patterns_select(name, layer, filter_modules, key)]
    for name in chosen:
        linears[name].fp8 = True
        if amax_history_len is not None:  # scanned layers: one history per layer [L, 3, amax_history_len]
            history = new_amax_history(amax_history_len)
            if stacked_at(name) is not None:
                history = jnp.broadcast_to(history, (linears[name].kernel.shape[0], *history.shape)) + 0
            linears[name].amax_history = AmaxHistory(history)
    return chosen


def amax_histories(model: nnx.Module) -> dict:
    """The delayed FP8 scaling state of `model` as a nested {name: [3, L] float32} dict like the parameters' ({} when
    no layer has delayed scaling)."""
    return pure_dict(model, AmaxHistory)


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.axes = ("vocab", "embed")
        self.dtype = dtype
        self.embedding = nnx.Param(_init(rngs.params(), (num_embeddings, features), param_dtype, init_std))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


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


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")

# HF `hidden_act` names and their JAX functions (gelu_new and gelu_pytorch_tanh are both the tanh approximation).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


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
    partial_rotary_factor: float = 1.0
    short_factor: tuple[float, ...] | None = None  # longrope: per-frequency divisors up to the original length
    long_factor: tuple[float, ...] | None = None  # longrope: ... beyond it
    attention_factor: float = 1.0  # longrope: multiplies cos and sin
    # M-RoPE (Qwen2.5-VL): frequencies split into sections; section i rotates by position component i % 3 of
    # positions [3, B, T] (temporal, height, width). None: one position per token.
    mrope_section: tuple[int, ...] | None = None

    @classmethod
    def from_hf(cls, hf: dict, *, partial_rotary: bool = False) -> "RopeConfig":
        """The one rope of a family whose layers all share it: flat `rope_parameters` updated by `rope_scaling`."""
        params = dict(hf.get("rope_parameters") or {})
        params.update(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        params.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if hf.get("original_max_position_embeddings"):  # Phi-3 keeps it outside the rope dict, and HF prefers it
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        return cls.parse(params, key=key, max_position_embeddings=hf.get("max_position_embeddings", 2048),
                         head_dim=head_dim, partial_rotary=partial_rotary)

    @classmethod
    def parse(cls, params: dict, *, key: str, max_position_embeddings: int, head_dim: int,
              partial_rotary: bool = False) -> "RopeConfig":
        """One HF rope parameter dict (`key` names where it came from in config.json, for errors)."""
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"config.json: {key}: rope type {kind!r} is not supported; supported: {ROPE_TYPES}")
        partial = float(params.get("partial_rotary_factor") or 1.0)
        if partial != 1.0 and not partial_rotary:
            raise ValueError(f"config.json: partial_rotary_factor {partial} is not supported for this model type "
                             f"(HF ignores it here too); remove it or set it to 1.0")
        original = params.get("original_max_position_embeddings") or max_position_embeddings
        factor = float(params.get("factor") or 1.0)
        extra = {}
        if kind == "longrope":
            half = int(head_dim * partial) // 2
            for name in ("short_factor", "long_factor"):
                if len(params.get(name) or ()) != half:
                    raise ValueError(f"config.json: {key}: longrope needs {name} with {half} numbers (rotary dim / 2)")
            factor = float(params.get("factor") or max_position_embeddings / original)
            default_attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
            extra = dict(short_factor=tuple(map(float, params["short_factor"])),
                         long_factor=tuple(map(float, params["long_factor"])),
                         attention_factor=float(params.get("attention_factor") or default_attention))
        return cls(theta=float(params.get("rope_theta", 10000.0)), type=kind, factor=factor,
                   low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=original, max_position_embeddings=max_position_embeddings,
                   partial_rotary_factor=partial, **extra)

    def inv_freq(self, head_dim: int, positions: jax.Array) -> jax.Array:
        """Inverse frequencies [rotary_dim/2] as HF computes them for this rope type (float32); with
        `mrope_section`, [3, rotary_dim/2]: row k keeps the frequencies of the sections position component k drives
        (zeros elsewhere), which `apply_rope` sums over positions [3, B, T].

        `positions` [B, T] (or [3, B, T]) matter only to "dynamic" and "longrope", which HF switches when
        max(positions) + 1 exceeds (original_)max_position_embeddings (traced here, so one compile serves every length).
        """
        inv = self._inv_freq(head_dim, positions)
        if self.mrope_section is None:
            return inv
        if sum(self.mrope_section) != inv.shape[0]:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to rotary dim / 2 = {inv.shape[0]}")
        component = jnp.asarray(sum(([i % 3] * n for i, n in enumerate(self.mrope_section)), []))
        return jnp.where(component[None, :] == jnp.arange(3)[:, None], inv[None, :], 0.0)

    def _inv_freq(self, head_dim: int, positions: jax.Array) -> jax.Array:
        dim = int(head_dim * self.partial_rotary_factor)
        exponents = jnp.arange(0, dim, 2, dtype=jnp.int32).astype(jnp.float32) / dim
        base = jnp.float32(self.theta)
        if self.type == "dynamic":
            seq_len = (jnp.max(positions) + 1).astype(jnp.float32)
            ratio = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            base = jnp.where(seq_len > self.max_position_embeddings, base * ratio ** (dim / (dim - 2)), base)
        inv = 1.0 / (base ** exponents)
        if self.type == "longrope":
            beyond = jnp.max(positions) + 1 > self.original_max_position_embeddings
            inv = 1.0 / (jnp.where(beyond, jnp.asarray(self.long_factor), jnp.asarray(self.short_factor))
                         * base ** exponents)
        elif self.type == "linear":
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


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, attention_factor: float = 1.0) -> jax.Array:
    """HF's non-interleaved rotary embedding on the first 2*len(inv_freq) features (partial rotary leaves the rest).

    x [B, T, heads, D], positions [B, T]; cos and sin are scaled by `attention_factor` (longrope). Multi-axis rope
    (M-RoPE, 2-D vision rope): inv_freq [K, rotary_dim/2] with one masked row per position component and positions
    [K, B, T] (or [B, T], every component equal): the angle is the sum over k of positions[k] * inv_freq[k], each
    frequency taking exactly one component's position (the others contribute exact zeros)."""
    rotary_dim = 2 * inv_freq.shape[-1]
    x, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if inv_freq.ndim == 2:
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions, (inv_freq.shape[0], *positions.shape))
        freqs = jnp.sum(positions[..., None].astype(jnp.float32) * inv_freq[:, None, None, :], axis=0)
    else:
        freqs = positions[..., None].astype(jnp.float32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = (jnp.cos(emb) * attention_factor).astype(x.dtype), (jnp.sin(emb) * attention_factor).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return jnp.concatenate([x * cos + rotated * sin, rest], axis=-1)


class GatedMLP(nnx.Module):
    """down_proj(act(gate) * up): gate_proj and up_proj, or one fused gate_up_proj [hidden, 2*inter] (Phi-3)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, activation: str, use_bias: bool, fused: bool,
                 dtype, param_dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=init_std)
        self.activation, self.fused = activation, fused
        if fused:
            self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, axes=("embed", "mlp"), **kw)
        else:
            self.gate_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **kw)
            self.up_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x, dropout_rng), 2, axis=-1)
        else:
            gate, up = apply_linears(x, (self.gate_proj, self.up_proj), dropout_rng)
        hidden = constrain(ACTIVATIONS[self.activation](gate) * up, ("batch", "seq", "mlp"))
        return self.down_proj(hidden, dropout_rng)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias, normalised in float32.

    x [..., features] -> [..., features] in the compute dtype; `scale` and `bias` are HF's `weight` and `bias`."""

    def __init__(self, features: int, *, eps: float, dtype, param_dtype, use_bias: bool = True):
        self.axes = ("norm",)
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)
