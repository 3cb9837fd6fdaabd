"""LoRA fine-tuning of Qwen2 models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
all *_proj layers; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "qwen2.5-0.5b" = Qwen/Qwen2.5-0.5B-Instruct: 24 layers, hidden 896, 14 query / 2 KV heads,
vocab 151,936, tied embeddings.
"""
from automodel_jax.recipes.llm.presets import squad

MODELS = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "qwen2.5-0.5b"
    return squad(f"runs/{name}_squad_lora", MODELS[name], global_batch=64, micro_batch=8, seq_len=512)
