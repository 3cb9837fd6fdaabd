"""Mistral family: Llama with sliding-window attention on every layer when config.json sets `sliding_window`."""
from __future__ import annotations

import dataclasses

from automodel_jax.models.base import register
from automodel_jax.models.decoder import SLIDING, DecoderConfig, DecoderLM, hf_base_fields


@dataclasses.dataclass(frozen=True)
class MistralConfig(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: dict) -> "MistralConfig":
        window = hf.get("sliding_window")
        types = (SLIDING,) * hf["num_hidden_layers"] if window else ()
        return cls(**hf_base_fields(hf, "mistral"), sliding_window=window, layer_types=types)


@register("mistral")
class MistralForCausalLM(DecoderLM):
    config_class = MistralConfig
