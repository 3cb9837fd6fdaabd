"""LoRA fine-tuning of Llama-family models.

Presets: "" (default) = the embedded default (a small Llama the project builds itself, on a held-out word task; runs
on a laptop CPU in a few minutes, no network); "llama3.2-1b" = NeMo Automodel's llama3_2_1b_squad_peft (LoRA r=8,
alpha=32 on all *_proj, Adam lr 1e-5 cosine to 1e-6, global batch 64, local batch 8, SQuAD); "llama3.1-8b".
"""
from automodel_jax.recipes.llm.presets import embedded_default, squad

PRESETS = ("", "llama3.2-1b", "llama3.1-8b")


def get_config(preset: str = ""):
    if preset == "llama3.2-1b":
        return squad("runs/llama3.2-1b_squad_lora", "meta-llama/Llama-3.2-1B", global_batch=64, micro_batch=8,
                     seq_len=512)
    if preset == "llama3.1-8b":
        return squad("runs/llama3.1-8b_squad_lora", "meta-llama/Llama-3.1-8B", global_batch=32, micro_batch=4,
                     seq_len=1024)
    return embedded_default("runs/llama_lora", lora=True, learning_rate=5e-3)
