"""Full-parameter SFT of Llama-family models (every weight trained; peft.method="none").

Presets: "" (default) = the embedded default (the project's own small Llama and held-out word task, float32 on a
laptop CPU, no network); "llama3.2-1b" = NeMo Automodel's llama3_2_1b_squad (global batch 64, local batch 8, lr 1e-5
cosine to 1e-6, SQuAD) with AdamW and bfloat16 compute over float32 master weights; "llama3.1-8b" likewise, sharded
over all devices (FSDP).
"""
from automodel_jax.recipes.llm.presets import embedded_default, squad

PRESETS = ("", "llama3.2-1b", "llama3.1-8b")


def get_config(preset: str = ""):
    if preset == "llama3.2-1b":
        return squad("runs/llama3.2-1b_squad_sft", "meta-llama/Llama-3.2-1B", global_batch=64, micro_batch=8,
                     seq_len=512, lora_targets=None)
    if preset == "llama3.1-8b":
        return squad("runs/llama3.1-8b_squad_sft", "meta-llama/Llama-3.1-8B", global_batch=32, micro_batch=4,
                     seq_len=1024, lora_targets=None)
    return embedded_default("runs/llama_sft", lora=False, learning_rate=1e-3)
