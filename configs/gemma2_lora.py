"""LoRA fine-tuning of Gemma 2 models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
all *_proj layers; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "gemma2-2b" = google/gemma-2-2b-it: 26 layers, hidden 2304, 8 query / 4 KV heads of dim 256,
vocab 256,000, sliding window 4096 on every other layer, attention / final logit soft-caps 50 / 30.
"""
from automodel_jax.recipes.llm.presets import squad

MODELS = {"gemma2-2b": "google/gemma-2-2b-it"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "gemma2-2b"
    return squad(f"runs/{name}_squad_lora", MODELS[name], global_batch=32, micro_batch=4, seq_len=512)
