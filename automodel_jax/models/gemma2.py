"""Gemma 2 family: RMSNorm (1 + weight), embeddings times sqrt(hidden), GeGLU, norms before and after attention and
MLP, query scale from `query_pre_attn_scalar`, attention and final-logit soft-capping, alternating sliding-window and
global layers."""
from __future__ import annotations

import dataclasses

from automodel_jax.models.base import register
from automodel_jax.models.decoder import FULL, SLIDING, DecoderConfig, DecoderLM, hf_base_fields, hf_layer_types


def gemma_fields(hf: dict, model_type: str, *, rope=None, sliding_every: int, final_softcap, attn_softcap) -> dict:
    """What Gemma 2 and 3 share; `sliding_every` n: HF's default pattern makes every n-th layer global."""
    window = hf.get("sliding_window", 4096)
    default = [SLIDING if (i + 1) % sliding_every else FULL for i in range(hf["num_hidden_layers"])]
    bias = hf.get("attention_bias", False)
    return dict(**hf_base_fields(hf, model_type, act_key="hidden_activation", default_act="gelu_pytorch_tanh",
                                 tie_default=True, rope=rope),
                sliding_window=window, layer_types=hf_layer_types(hf, default, window), qkv_bias=bias, o_bias=bias,
                norm_offset=1.0, scale_embeddings=True, sandwich_norms=True,
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256), final_logit_softcap=final_softcap,
                attn_logit_softcap=attn_softcap)


@dataclasses.dataclass(frozen=True)
class Gemma2Config(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: dict) -> "Gemma2Config":
        return cls(**gemma_fields(hf, "gemma2", sliding_every=2,
                                  final_softcap=hf.get("final_logit_softcapping", 30.0),
                                  attn_softcap=hf.get("attn_logit_softcapping", 50.0)))


@register("gemma2")
class Gemma2ForCausalLM(DecoderLM):
    config_class = Gemma2Config
