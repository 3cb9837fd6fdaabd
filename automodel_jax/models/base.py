"""What every causal LM family shares: the public call, logits from hidden states, HF export, the registry."""
from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from automodel_jax.models.attention import AttentionInputs

REMAT_POLICIES = ("none", "full", "save_dots")
_REGISTRY: dict[str, type["CausalLM"]] = {}


def register(model_type: str):
    """Class decorator: make a CausalLM loadable from HF configs whose `model_type` is `model_type`."""
    def wrap(cls):
        _REGISTRY[model_type] = cls
        return cls
    return wrap


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def model_class_for(hf_config: dict, where: str = "config.json") -> type["CausalLM"]:
    model_type = hf_config.get("model_type")
    if model_type not in _REGISTRY:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(supported_model_types())}")
    return _REGISTRY[model_type]


def family_config(hf_config: dict, where: str = "config.json", overrides: dict | None = None):
    """(model class, its config) for an HF config dict; `overrides` (e.g. remat="full") replace config fields."""
    cls = model_class_for(hf_config, where)
    return cls, dataclasses.replace(cls.config_class.from_hf(hf_config), **(overrides or {}))


@dataclasses.dataclass(frozen=True)
class HFSource:
    """Where a model came from: its directory (for tokenizer/config files on export) and per-tensor HF dtypes."""
    directory: str | None = None
    config_json: str | None = None
    dtypes: tuple[tuple[str, str], ...] = ()


def build_model(hf_config: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0, **overrides):
    """A randomly initialised model of the family `hf_config` (an HF config dict) names, remembering that config for
    export. Raises ValueError for an unsupported model_type."""
    cls, cfg = family_config(hf_config, "hf_config", overrides)
    model = cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
    model.hf_source = HFSource(None, json.dumps(hf_config))
    return model


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown activation checkpointing policy {name!r}; choose one of {REMAT_POLICIES}")
    return {"full": jax.checkpoint_policies.nothing_saveable,
            "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}.get(name)


# Primitives whose outputs a scanned layer recomputes in the backward pass rather than saves (`scan_save_policy`):
# elementwise arithmetic and functions, casts, data movement and sharding annotations (`constrain`), each as cheap
# to redo as to read back. Not exp: XLA:CPU's exp inside a backward fusion can differ in the last bit from the
# forward's (the XLA attention's softmax), so it is saved. Values computed from constants alone (rope's inverse
# frequencies: iota, pow) must stay recomputable: a saved value is fenced (reduce_precision), which stops XLA folding
# it at compile time as it does in unrolled layers. tests/models/test_scan_layers.py trains scanned and unrolled
# layers to the same bits.
RECOMPUTED_IN_SCAN = frozenset((
    "convert_element_type", "add", "add_any", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "square",
    "integer_pow", "pow", "exp2", "log", "log1p", "logistic", "tanh", "sin", "cos", "rsqrt", "sqrt", "erf",
    "select_n", "clamp", "and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "broadcast_in_dim", "reshape",
    "squeeze", "expand_dims", "concatenate", "slice", "split", "transpose", "copy", "copy_p", "iota",
    "sharding_constraint", "reshard"))


def scan_save_policy(prim, *_, **__) -> bool:
    """What a scanned layer saves for its backward pass under remat "none": everything but the outputs of cheap
    elementwise / data-movement primitives (`RECOMPUTED_IN_SCAN`), which are recomputed from what is saved.

    Unrolled layers need no policy: XLA fuses such producers into their backward consumers, so their results (the
    float32 upcast in RMSNorm, SiLU's sigmoid, rope's rotations) are never kept. A scan's residuals are outputs of
    its forward loop, stacked over the layers, which XLA cannot fuse away: without this policy every one of them is
    kept (H200, Llama-3.1-8B LoRA b4 s2048: 78.3 GB against 60.0 GB unrolled)."""
    return prim.name not in RECOMPUTED_IN_SCAN


class CausalLM(nnx.Module):
    """Base of every family: subclasses build `self.model` (and `lm_head` unless tied) and define
    `hidden_states(input_ids, inputs: AttentionInputs, cache)` and `init_cache`.

    `config_class` turns an HF config dict into the family's frozen config dataclass (which has
    `tie_word_embeddings` and `final_logit_softcap`).
    """
    config_class: ClassVar[type]
    hf_source: HFSource = HFSource()

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 right_padded: bool = False, dropout_rng: jax.Array | None = None, cache=None):
        """Logits [batch, seq, vocab]. `attention_mask` (1 = token, 0 = padding) or `segment_ids` (packing).

        With a KV `cache` (from `init_cache`), the tokens are appended to it and (logits, new cache) is returned.
        """
        inputs = AttentionInputs.build(input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                                       right_padded=right_padded and cache is None, dropout_rng=dropout_rng,
                                       cache_index=None if cache is None else cache.index)
        out = self.hidden_states(input_ids, inputs, cache)
        if cache is None:
            return self.logits(out, dropout_rng)
        h, cache = out
        return self.logits(h, dropout_rng), cache

    @property
    def logit_softcap(self) -> float | None:
        """Final-logit soft-cap c (logits = c * tanh(logits / c); Gemma) for losses that compute logits themselves."""
        return self.config.final_logit_softcap

    def logits(self, h: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Logits [..., vocab] of final hidden states h [..., hidden] (soft-capped where the family caps them)."""
        hidden, kernel = self.output_head(h, dropout_rng)
        logits = jnp.dot(hidden, kernel.astype(hidden.dtype))
        cap = self.logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def output_head(self, h: jax.Array, dropout_rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(hidden [..., H'], kernel [H', vocab]) whose product is the logits before soft-capping, for the logits and
        every fused loss: h and the tied embedding transposed, or the lm_head's `Linear.matmul_operands` (with a LoRA
        adapter on lm_head, H' = hidden + r and the adapter takes part, as in PEFT)."""
        if self.config.tie_word_embeddings:
            return h, self.model.embed_tokens.embedding[...].T
        return self.lm_head.matmul_operands(h, dropout_rng)
