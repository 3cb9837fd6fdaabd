"""LoRA fine-tuning of Gemma 3 (text) models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
all *_proj layers; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "gemma3-1b" = google/gemma-3-1b-it (HF model_type gemma3_text): 26 layers, hidden 1152,
4 query / 1 KV heads of dim 256, vocab 262,144, five 512-token sliding-window layers per global one.
"""
from automodel_jax.recipes.llm.presets import squad

MODELS = {"gemma3-1b": "google/gemma-3-1b-it"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "gemma3-1b"
    return squad(f"runs/{name}_squad_lora", MODELS[name], global_batch=64, micro_batch=8, seq_len=512)
