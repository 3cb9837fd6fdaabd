"""Llama family (Llama 2, 3, 3.1, 3.2 and anything with model_type "llama") with HF-identical module names.

`model.layers.3.self_attn.q_proj.kernel` here is `model.layers.3.self_attn.q_proj.weight` (transposed) in HF.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from automodel_jax.models.attention import attention
from automodel_jax.models.base import CausalLM, register, remat_policy
from automodel_jax.models.layers import Embedding, Linear, RMSNorm, RopeConfig, apply_rope

SUPPORTED_ACTIVATIONS = ("silu",)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    remat: str = "none"
    attention_impl: str = "auto"

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        act = hf.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {act!r} is not supported for llama; supported: "
                             f"{SUPPORTED_ACTIVATIONS}")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"config.json: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=kv_heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                   rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope=RopeConfig.from_hf(hf),
                   tie_word_embeddings=hf.get("tie_word_embeddings", False),
                   attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                   initializer_range=hf.get("initializer_range", 0.02))


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  init_std=cfg.initializer_range)
        self.q_proj = Linear(h, cfg.num_attention_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(h, cfg.num_key_value_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(h, cfg.num_key_value_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, h, axes=("heads", "embed"), **kw)

    def __call__(self, x, positions, segment_ids, inv_freq, right_padded, dropout_rng):
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.q_proj(x, dropout_rng).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x, dropout_rng).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x, dropout_rng).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        out = attention(q, k, v, segment_ids, right_padded=right_padded, impl=cfg.attention_impl)
        return self.o_proj(out.reshape(b, t, -1), dropout_rng)


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  init_std=cfg.initializer_range)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x, dropout_rng=None):
        return self.down_proj(jax.nn.silu(self.gate_proj(x, dropout_rng)) * self.up_proj(x, dropout_rng), dropout_rng)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = LlamaMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)

    def __call__(self, x, positions, segment_ids, inv_freq, right_padded=False, dropout_rng=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids, inv_freq, right_padded, dropout_rng)
        return x + self.mlp(self.post_attention_layernorm(x), dropout_rng)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs, init_std=cfg.initializer_range)
        self.layers = nnx.List([LlamaDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids, positions, segment_ids, right_padded=False, dropout_rng=None):
        x = self.embed_tokens(input_ids)
        inv_freq = self.cfg.rope.inv_freq(self.cfg.head_dim, input_ids.shape[1])
        policy = remat_policy(self.cfg.remat)

        def run_layer(layer, x, positions, segment_ids, inv_freq, dropout_rng):
            return layer(x, positions, segment_ids, inv_freq, right_padded, dropout_rng)

        if self.cfg.remat != "none":
            run_layer = nnx.remat(run_layer, policy=policy)
        for layer in self.layers:
            x = run_layer(layer, x, positions, segment_ids, inv_freq, dropout_rng)
        return self.norm(x)


@register("llama")
class LlamaForCausalLM(CausalLM):
    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, use_bias=False, axes=("embed", "vocab"),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=config.initializer_range)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None,
                      right_padded=False, dropout_rng=None):
        positions, segment_ids = self._inputs(input_ids, attention_mask, positions, segment_ids)
        return self.model(input_ids, positions, segment_ids, right_padded, dropout_rng)
