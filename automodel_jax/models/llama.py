"""Llama family (Llama 2, 3, 3.1, 3.2 and anything with model_type "llama"): the plain `DecoderConfig` defaults."""
from __future__ import annotations

import dataclasses

from automodel_jax.models.base import register
from automodel_jax.models.decoder import DecoderConfig, DecoderLM, hf_base_fields


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        bias = hf.get("attention_bias", False)
        return cls(**hf_base_fields(hf, "llama"), qkv_bias=bias, o_bias=bias, mlp_bias=hf.get("mlp_bias", False))


@register("llama")
class LlamaForCausalLM(DecoderLM):
    config_class = LlamaConfig
