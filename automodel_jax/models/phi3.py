"""Phi-3 family (Phi-3, Phi-3.5 and Phi-4-mini text models): Llama with HF's fused `qkv_proj` and `gate_up_proj` kept
as they are, partial rotary embeddings, longrope scaling, and an optional sliding window on every layer."""
from __future__ import annotations

import dataclasses

from automodel_jax.models.base import register
from automodel_jax.models.decoder import SLIDING, DecoderConfig, DecoderLM, hf_base_fields
from automodel_jax.models.layers import RopeConfig


@dataclasses.dataclass(frozen=True)
class Phi3Config(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: dict) -> "Phi3Config":
        window = hf.get("sliding_window")
        types = (SLIDING,) * hf["num_hidden_layers"] if window else ()
        return cls(**hf_base_fields(hf, "phi3", rope=RopeConfig.from_hf(hf, partial_rotary=True)),
                   sliding_window=window, layer_types=types, fused_qkv=True, fused_gate_up=True)


@register("phi3")
class Phi3ForCausalLM(DecoderLM):
    config_class = Phi3Config
