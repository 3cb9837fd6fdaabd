"""automodel-jax: fine-tune Hugging Face LLMs with SFT and LoRA in JAX/Flax."""
from automodel_jax.models import AutoModelForCausalLM

__all__ = ["AutoModelForCausalLM"]
__version__ = "0.1.0"
