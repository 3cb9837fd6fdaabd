"""Qwen3 family: Qwen2's layout without the forced q/k/v bias, plus per-head RMSNorm of q and k (q_norm, k_norm)."""
from __future__ import annotations

import dataclasses

from automodel_jax.models.base import register
from automodel_jax.models.decoder import DecoderConfig, DecoderLM, hf_base_fields
from automodel_jax.models.qwen2 import qwen_sliding_fields


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: dict) -> "Qwen3Config":
        bias = hf.get("attention_bias", False)
        return cls(**hf_base_fields(hf, "qwen3"), **qwen_sliding_fields(hf), qkv_bias=bias, o_bias=bias,
                   qk_norm=True)


@register("qwen3")
class Qwen3ForCausalLM(DecoderLM):
    config_class = Qwen3Config
