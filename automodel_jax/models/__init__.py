"""Model families (one file each, registered by HF `model_type`) and the Auto entry point."""
from automodel_jax.models import llama  # noqa: F401  (registers "llama")
from automodel_jax.models.auto import AutoModelForCausalLM
from automodel_jax.models.base import CausalLM, supported_model_types

__all__ = ["AutoModelForCausalLM", "CausalLM", "supported_model_types"]
