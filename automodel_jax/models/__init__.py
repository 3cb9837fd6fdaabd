"""Model families (one file each, registered by HF `model_type`) and the Auto entry point."""
from automodel_jax.models import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3  # noqa: F401  (register them)
from automodel_jax.models.auto import AutoModelForCausalLM
from automodel_jax.models.base import CausalLM, supported_model_types
from automodel_jax.models.kvcache import KVCache

__all__ = ["AutoModelForCausalLM", "CausalLM", "KVCache", "supported_model_types"]
