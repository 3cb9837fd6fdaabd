"""The decoder-only transformer every family is an instance of, with HF-identical module names.

A family is a `DecoderConfig` subclass whose `from_hf` reads its HF config.json (validating every value it cannot
honour), plus a registered `DecoderLM` subclass. `model.layers.3.self_attn.q_proj.kernel` here is HF's
`model.layers.3.self_attn.q_proj.weight` (transposed).

With `scan_layers` the decoder layers are one module whose parameters are stacked [num_hidden_layers, ...]
(`model.layers.self_attn.q_proj.kernel` [L, in, out] is every layer's `model.layers.{i}.self_attn.q_proj.weight`,
see `params.layer_paths`), run by one `jax.lax.scan`: XLA compiles one layer instead of L copies of it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from automodel_jax.models.attention import AttentionInputs, attention
from automodel_jax.models.base import CausalLM, remat_policy, scan_save_policy
from automodel_jax.models.kvcache import KVCache, LayerCache
from automodel_jax.models.layers import (ACTIVATIONS, Embedding, GatedMLP, Linear, RMSNorm, RopeConfig, apply_linears,
                                         apply_rope)
from automodel_jax.parallel.sharding import constrain

FULL, SLIDING = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL, SLIDING)

# The residual stream [batch, seq, hidden]: batch over data/fsdp, sequence over context (the rule table).
RESIDUAL_AXES = ("batch", "seq", None)
# checkpoint_name of the rotated queries and keys.
ROPE_OUT = "rope_out"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a decoder LM; the defaults are Llama's. Families set the knobs their HF modeling code has."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    local_rope: RopeConfig | None = None  # rope of sliding-window layers where it differs (Gemma 3)
    layer_types: tuple[str, ...] = ()  # FULL / SLIDING per layer; () = every layer FULL
    sliding_window: int | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before rope (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # 1.0: Gemma's RMSNorm scales by (1 + weight)
    scale_embeddings: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma: norms after attention and MLP too (pre/post_feedforward_layernorm)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (default head_dim ** -0.5)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    fused_qkv: bool = False  # Phi-3: one qkv_proj
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    initializer_range: float = 0.02
    remat: str = "none"
    attention_impl: str = "auto"
    scan_layers: bool = False  # one stacked layer module run by a scan (needs identical layers; see DecoderModel)

    def __post_init__(self):
        types = {self.layer_type(i) for i in range(self.num_hidden_layers)}
        if self.scan_layers and len(types) > 1:
            raise ValueError(f"model.scan_layers=true needs identical decoder layers, but this model mixes "
                             f"{' and '.join(sorted(types))} layers (config.json layer_types / sliding window); set "
                             f"model.scan_layers=false")

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else FULL


def hf_base_fields(hf: dict, model_type: str, *, act_key: str = "hidden_act", default_act: str = "silu",
                   tie_default: bool = False, rope: RopeConfig | None = None) -> dict:
    """The DecoderConfig fields every family reads alike from HF config.json, validated with one-line errors."""
    act = hf.get(act_key) or default_act
    if act not in ACTIVATIONS:
        raise ValueError(f"config.json: {act_key} {act!r} is not supported for {model_type}; supported: "
                         f"{tuple(ACTIVATIONS)}")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"config.json: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv_heads}")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"config.json: use_bidirectional_attention is not supported for {model_type} (causal LMs "
                         f"only); set it to false")
    return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope=rope or RopeConfig.from_hf(hf), hidden_act=act,
                tie_word_embeddings=hf.get("tie_word_embeddings", tie_default),
                initializer_range=hf.get("initializer_range", 0.02))


def hf_layer_types(hf: dict, default: list[str], sliding_window: int | None) -> tuple[str, ...]:
    """config.json's `layer_types` (or the family's default pattern), checked against the sliding window."""
    types = hf.get("layer_types") or default
    if len(types) != hf["num_hidden_layers"]:
        raise ValueError(f"config.json: layer_types has {len(types)} entries but num_hidden_layers is "
                         f"{hf['num_hidden_layers']}")
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"config.json: layer_types entry {unknown[0]!r} is not supported; supported: {LAYER_TYPES}")
    if SLIDING in types and not sliding_window:
        raise ValueError("config.json: layer_types has sliding_attention layers but sliding_window is not set")
    return tuple(types)


class DecoderAttention(nnx.Module):
    """Self-attention of every decoder family, with HF's submodule names.

    q_proj/k_proj/v_proj (or Phi-3's fused qkv_proj) and o_proj; optional per-head q_norm/k_norm (Qwen3, Gemma 3)
    applied before rope; the rope, sliding window, soft-cap and query scale of this layer from the config.
    """

    def __init__(self, cfg: DecoderConfig, *, sliding: bool, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.sliding_window = cfg.sliding_window if sliding else None
        self.rope = cfg.local_rope if sliding and cfg.local_rope is not None else cfg.rope
        self.scale = None if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar ** -0.5
        self.softcap, self.impl, self.fused = cfg.attn_logit_softcap, cfg.attention_impl, cfg.fused_qkv
        h, hd = cfg.hidden_size, cfg.head_dim
        q_out, kv_out = self.num_heads * hd, self.num_kv_heads * hd
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=cfg.initializer_range)
        if self.fused:
            self.qkv_proj = Linear(h, q_out + 2 * kv_out, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
        else:
            self.q_proj = Linear(h, q_out, use_bias=cfg.qkv_bias, axes=("embed", "heads"), **kw)
            self.k_proj = Linear(h, kv_out, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
            self.v_proj = Linear(h, kv_out, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(q_out, h, use_bias=cfg.o_bias, axes=("heads", "embed"), **kw)
        self.qk_norm = cfg.qk_norm
        if self.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, offset=cfg.norm_offset)
            self.q_norm, self.k_norm = RMSNorm(hd, **norm), RMSNorm(hd, **norm)

    def _project(self, x, dropout_rng):
        if self.fused:
            q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = jnp.split(self.qkv_proj(x, dropout_rng), [q_out, q_out + kv_out], axis=-1)
        else:
            q, k, v = apply_linears(x, (self.q_proj, self.k_proj, self.v_proj), dropout_rng)
        b, t, _ = x.shape
        return (q.reshape(b, t, self.num_heads, self.head_dim), k.reshape(b, t, self.num_kv_heads, self.head_dim),
                v.reshape(b, t, self.num_kv_heads, self.head_dim))

    def __call__(self, x, inputs: AttentionInputs,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """Output [B, T, hidden] and, with a cache, the cache with this call's keys and values written in."""
        positions = inputs.positions
        q, k, v = self._project(x, inputs.dropout_rng)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = self.rope.inv_freq(self.head_dim, positions)
        # Named: a scanned layer keeps the rotated q and k for attention's backward pass (`scan_save_policy`), which
        # need then not keep the projections they come from.
        q = checkpoint_name(apply_rope(q, positions, inv_freq, self.rope.attention_factor), ROPE_OUT)
        k = checkpoint_name(apply_rope(k, positions, inv_freq, self.rope.attention_factor), ROPE_OUT)
        if cache is not None:
            cache = cache.update(k, v)
            k, v = (buffer.astype(q.dtype) for buffer in cache.keys_values())
        out = attention(q, k, v, inputs, scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap,
                        impl=self.impl, cache=cache)
        return self.o_proj(out.reshape(*x.shape[:2], -1), inputs.dropout_rng), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_type: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, offset=cfg.norm_offset)
        self.self_attn = DecoderAttention(cfg, sliding=layer_type == SLIDING, dtype=dtype, param_dtype=param_dtype,
                                          rngs=rngs)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, activation=cfg.hidden_act, use_bias=cfg.mlp_bias,
                            fused=cfg.fused_gate_up, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                            init_std=cfg.initializer_range)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.sandwich_norms = cfg.sandwich_norms
        if self.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)

    def __call__(self, x, inputs: AttentionInputs, cache: LayerCache | None = None):
        with jax.named_scope("self_attn"):
            h, cache = self.self_attn(self.input_layernorm(x), inputs, cache)
        with jax.named_scope("mlp"):
            if self.sandwich_norms:  # Gemma: post_attention_layernorm normalises the attention output
                x = x + self.post_attention_layernorm(h)
                h = self.mlp(self.pre_feedforward_layernorm(x), inputs.dropout_rng)
                return x + self.post_feedforward_layernorm(h), cache
            x = x + h  # Llama: post_attention_layernorm is the pre-MLP norm
            return x + self.mlp(self.post_attention_layernorm(x), inputs.dropout_rng), cache


def stacked_layers(cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> DecoderLayer:
    """One DecoderLayer whose parameters have a leading axis of cfg.num_hidden_layers (each layer initialised from
    its own split of `rngs`), for `jax.lax.scan` over the layers. The layers must be identical (`scan_layers`)."""
    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return DecoderLayer(cfg, cfg.layer_type(0), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return create(rngs)


class DecoderModel(nnx.Module):
    """embed_tokens, the decoder layers and the final norm. `layers` is an nnx.List of DecoderLayers, or with
    cfg.scan_layers one DecoderLayer whose parameters are stacked [num_hidden_layers, ...] and which a scan runs
    (one compiled layer; the same per-layer body, with the same activation checkpointing per layer)."""

    def __init__(self, cfg: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs, init_std=cfg.initializer_range)
        if cfg.scan_layers:
            self.layers = stacked_layers(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, cfg.layer_type(i), dtype=dtype, param_dtype=param_dtype,
                                                 rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype,
                            offset=cfg.norm_offset)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, hidden] in the compute dtype, scaled as the family does."""
        x = self.embed_tokens(input_ids)
        if self.cfg.scale_embeddings:  # in the compute dtype, as HF multiplies in the embedding's dtype
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
        return x

    def __call__(self, input_ids, inputs: AttentionInputs, cache: KVCache | None = None, *,
                 inputs_embeds: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B, T, hidden] of `input_ids` [B, T] (or of `inputs_embeds` [B, T, hidden], e.g. text
        embeddings with image features merged in), and the updated cache when one is given."""
        with jax.named_scope("embed_tokens"):
            x = constrain(self.embed(input_ids) if inputs_embeds is None else inputs_embeds, RESIDUAL_AXES)
        layer_caches = (None,) * self.cfg.num_hidden_layers if cache is None else \
            cache.for_tokens(inputs.segment_ids, inputs.positions)

        def run_layer(layer, x, inputs, layer_cache):
            x, layer_cache = layer(x, inputs, layer_cache)
            return constrain(x, RESIDUAL_AXES), layer_cache

        if self.cfg.remat != "none" and cache is None:
            # Inside a scan, CSE across the checkpoint cannot happen, so XLA needs no guard against it (faster).
            run_layer = nnx.remat(run_layer, policy=remat_policy(self.cfg.remat), prevent_cse=not self.cfg.scan_layers)
        elif self.cfg.scan_layers and cache is None:
            # remat "none" in a scan: keep what is costly to recompute, redo the cheap elementwise rest.
            run_layer = nnx.remat(run_layer, policy=scan_save_policy, prevent_cse=False)
        if self.cfg.scan_layers:
            x, layer_caches = self._scan_layers(run_layer, x, inputs, layer_caches[0])
        else:
            layer_caches = list(layer_caches)
            for i, layer in enumerate(self.layers):
                with jax.named_scope(f"layers.{i}"):
                    x, layer_caches[i] = run_layer(layer, x, inputs, layer_caches[i])
        with jax.named_scope("norm"):
            x = self.norm(x)
        return x, None if cache is None else KVCache.from_layers(layer_caches, x.shape[1])

    def _scan_layers(self, run_layer, x, inputs: AttentionInputs, layer_cache: LayerCache | None):
        """`run_layer` over the stacked layers with `jax.lax.scan`: the carry is the residual stream [B, T, hidden]
        (and with a cache, the stacked key/value buffers [L, B, S, K, D], each layer writing its own slots); the scanned
        inputs are each layer's parameters and its index (which also varies the LoRA dropout masks per layer)."""
        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            x, kv = carry
            layer_state, i = xs
            layer_inputs = inputs if inputs.dropout_rng is None else \
                dataclasses.replace(inputs, dropout_rng=jax.random.fold_in(inputs.dropout_rng, i))
            view = None if kv is None else layer_cache._replace(k=kv[0], v=kv[1], layer=i)
            x, view = run_layer(nnx.merge(graphdef, layer_state), x, layer_inputs, view)
            return (x, None if view is None else (view.k, view.v)), None

        kv = None if layer_cache is None else (layer_cache.k, layer_cache.v)
        with jax.named_scope("layers"):
            (x, kv), _ = jax.lax.scan(body, (x, kv), (state, jnp.arange(self.cfg.num_hidden_layers, dtype=jnp.int32)))
        return x, None if kv is None else [layer_cache._replace(k=kv[0], v=kv[1])]


class DecoderLM(CausalLM):
    """A decoder family's CausalLM: `model` (embed_tokens, layers, norm) and `lm_head` unless embeddings are tied."""
    config_class = DecoderConfig

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.model = DecoderModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, axes=("embed", "vocab"),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=config.initializer_range)

    def hidden_states(self, input_ids, inputs: AttentionInputs, cache: KVCache | None = None):
        """Final hidden states [B, T, hidden]; with `cache`, (hidden states, cache with these tokens appended)."""
        with jax.named_scope("model"):
            h, cache = self.model(input_ids, inputs, cache)
        return h if cache is None else (h, cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (dtype default: the compute dtype)."""
        cfg = self.config
        return KVCache.create(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim,
                              self.model.embed_tokens.dtype if dtype is None else dtype, stacked=cfg.scan_layers)
