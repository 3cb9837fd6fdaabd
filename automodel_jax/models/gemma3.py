"""Gemma 3 text family (`gemma3_text`, e.g. gemma-3-1b): Gemma 2's layout plus per-head q_norm/k_norm, a separate rope
base for the sliding-window layers, and no attention soft-capping (HF's Gemma 3 attention ignores
`attn_logit_softcapping`, so it is ignored here too)."""
from __future__ import annotations

import dataclasses

from automodel_jax.models.base import register
from automodel_jax.models.decoder import FULL, SLIDING, DecoderConfig, DecoderLM
from automodel_jax.models.gemma2 import gemma_fields
from automodel_jax.models.layers import RopeConfig


def _gemma3_ropes(hf: dict) -> tuple[RopeConfig, RopeConfig]:
    """(global rope, local rope): `rope_parameters` nested by layer type (transformers >= 5), or the older flat
    rope_theta / rope_scaling (global layers only) / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    max_pos = hf.get("max_position_embeddings", 131072)
    if FULL in params or SLIDING in params:
        full = {"rope_theta": 1_000_000.0, **(params.get(FULL) or {})}
        local = {"rope_theta": 10_000.0, **(params.get(SLIDING) or {})}
        keys = (f"rope_parameters.{FULL}", f"rope_parameters.{SLIDING}")
    else:
        full = {**params, **(hf.get("rope_scaling") or {})}
        full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
        keys = ("rope_scaling", "rope_local_base_freq")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return tuple(RopeConfig.parse(p, key=k, max_position_embeddings=max_pos, head_dim=head_dim)
                 for p, k in ((full, keys[0]), (local, keys[1])))


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig(DecoderConfig):
    @classmethod
    def from_hf(cls, hf: dict) -> "Gemma3TextConfig":
        rope, local_rope = _gemma3_ropes(hf)
        every = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return cls(**gemma_fields(hf, "gemma3_text", rope=rope, sliding_every=every,
                                  final_softcap=hf.get("final_logit_softcapping"), attn_softcap=None),
                   local_rope=local_rope, qk_norm=True)


@register("gemma3_text")
class Gemma3ForCausalLM(DecoderLM):
    config_class = Gemma3TextConfig
