"""LoRA fine-tuning of Phi-3 models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
qkv_proj, o_proj, gate_up_proj, down_proj; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "phi3-mini-4k" = microsoft/Phi-3-mini-4k-instruct: 32 layers, hidden 3072, 32 query / 32 KV
heads, fused qkv_proj and gate_up_proj, vocab 32,064, 4k context.
"""
from automodel_jax.recipes.llm.presets import squad

MODELS = {"phi3-mini-4k": "microsoft/Phi-3-mini-4k-instruct"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "phi3-mini-4k"
    return squad(f"runs/{name}_squad_lora", MODELS[name], global_batch=32, micro_batch=4, seq_len=512,
                 lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
