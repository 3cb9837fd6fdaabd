"""Qwen2 / Qwen2.5 family: Llama with q/k/v biases (no o_proj bias) and optional sliding windows on upper layers."""
from __future__ import annotations

import dataclasses

from automodel_jax.models.base import register
from automodel_jax.models.decoder import FULL, SLIDING, DecoderConfig, DecoderLM, hf_base_fields, hf_layer_types


def qwen_sliding_fields(hf: dict) -> dict:
    """Qwen's windows: only with use_sliding_window, then on layers >= max_window_layers (or as layer_types say)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window is None:
        return {}
    first = hf.get("max_window_layers", 28)
    default = [SLIDING if i >= first else FULL for i in range(hf["num_hidden_layers"])]
    return dict(sliding_window=window, layer_types=hf_layer_types(hf, default, window))


@dataclasses.dataclass(frozen=True)
class Qwen2Config(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: dict) -> "Qwen2Config":
        return cls(**hf_base_fields(hf, "qwen2"), **qwen_sliding_fields(hf), qkv_bias=True)


@register("qwen2")
class Qwen2ForCausalLM(DecoderLM):
    config_class = Qwen2Config
