"""automodel-jax: fine-tune Hugging Face LLMs and VLMs with SFT and LoRA in JAX/Flax.

Layout: components (`models`, `peft`, `data`, `losses`, `kernels`, `parallel`, `checkpoint`, `training`,
`evaluation`, `generation`, `launcher`, `config`) are composed by thin recipes (`recipes.llm`, `recipes.vlm`); the
command-line entry points live in `cli` (with `python -m automodel_jax.COMMAND` shims beside this file); `auto` is the
HF-shaped facade. The import rules are contracts in pyproject.toml, checked by `lint-imports` in CI.
"""
import logging

# transformers advises at import that "PyTorch was not found": automodel_jax never uses transformers' models (only its
# tokenizers, processors and configs), so that advice is noise here; every other transformers message stays.
logging.getLogger("transformers").addFilter(lambda record: "PyTorch was not found" not in record.getMessage())

from automodel_jax.auto import AutoModelForCausalLM, AutoModelForImageTextToText, save_pretrained

__all__ = ["AutoModelForCausalLM", "AutoModelForImageTextToText", "save_pretrained"]
__version__ = "0.1.0"
