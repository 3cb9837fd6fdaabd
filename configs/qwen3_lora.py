"""LoRA fine-tuning of Qwen3 models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
all *_proj layers; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "qwen3-0.6b" = Qwen/Qwen3-0.6B: 28 layers, hidden 1024, 16 query / 8 KV heads of dim 128,
q/k RMSNorm, vocab 151,936, tied embeddings.
"""
from automodel_jax.recipes.llm.presets import squad

MODELS = {"qwen3-0.6b": "Qwen/Qwen3-0.6B"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "qwen3-0.6b"
    return squad(f"runs/{name}_squad_lora", MODELS[name], global_batch=64, micro_batch=8, seq_len=512)
