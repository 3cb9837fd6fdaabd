"""LoRA fine-tuning of Mistral models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
all *_proj layers; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "mistral-7b" = mistralai/Mistral-7B-Instruct-v0.3: 32 layers, hidden 4096, 32 query / 8 KV
heads, vocab 32,768, no sliding window.
"""
from automodel_jax.recipes.llm.presets import squad

MODELS = {"mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "mistral-7b"
    return squad(f"runs/{name}_squad_lora", MODELS[name], global_batch=32, micro_batch=4, seq_len=1024)
