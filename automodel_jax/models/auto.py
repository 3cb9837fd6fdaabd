"""`AutoModelForCausalLM`: the HF-shaped entry point that picks a family by `model_type`."""
from __future__ import annotations

import json

import jax.numpy as jnp
from flax import nnx

from automodel_jax.models.base import CausalLM, HFSource, family_config


def _dtype(x):
    return jnp.dtype(x) if x is not None else None


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path, *, dtype=jnp.float32, param_dtype=None, mesh=None, **model_overrides) -> CausalLM:
        """Load a local HF checkpoint directory or Hub name. `dtype` is the compute dtype, `param_dtype` the storage
        dtype (default: same as dtype); `mesh` shards the parameters (None = one device); overrides such as
        remat="full" or attention_impl="xla" replace fields of the family's config."""
        from automodel_jax.checkpoint.hf import load_pretrained
        dtype = _dtype(dtype)
        return load_pretrained(path, dtype=dtype, param_dtype=_dtype(param_dtype) or dtype, mesh=mesh,
                               model_overrides=model_overrides or None)

    @staticmethod
    def from_config(hf_config: dict, *, dtype=jnp.float32, param_dtype=None, seed: int = 0,
                    **model_overrides) -> CausalLM:
        """A randomly initialised model for an HF config dict (for pre-training from scratch and benchmarks)."""
        cls, cfg = family_config(hf_config, "hf_config", model_overrides)
        dtype = _dtype(dtype)
        model = cls(cfg, dtype=dtype, param_dtype=_dtype(param_dtype) or dtype, rngs=nnx.Rngs(seed))
        model.hf_source = HFSource(None, json.dumps(hf_config))
        return model
