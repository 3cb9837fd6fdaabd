"""Model families (one file each, registered by HF `model_type`) and the Auto entry point."""
from automodel_jax.models import (gemma2, gemma3, gemma3_vl, llama, mistral, phi3, qwen2,  # noqa: F401  (register them)
                                  qwen2_5_vl, qwen3)
from automodel_jax.models.base import CausalLM, supported_model_types
from automodel_jax.models.kvcache import KVCache

__all__ = ["CausalLM", "KVCache", "supported_model_types"]
