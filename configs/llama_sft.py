"""Full-parameter SFT of Llama-family models (every weight trained; peft.method="none").

Presets: "" (default) = the embedded default (the project's own small Llama and held-out word task, float32 on a
laptop CPU, no network); "llama3.2-1b" = NeMo Automodel's llama3_2_1b_squad (global batch 64, local batch 8, lr 1e-5
cosine to 1e-6, SQuAD) with AdamW and bfloat16 compute over float32 master weights; "llama3.1-8b" likewise, sharded
over all devices (FSDP); "llama3.2-1b-hellaswag-fp8" = NeMo Automodel's llama_3_2_1b_hellaswag_fp8 (HellaSwag from the
Hub, 64 validation rows, Adam without weight decay at lr 1e-5, FP8 tensorwise with lm_head kept in bf16) on
Llama-3.2-1B with global batch 8 and 300 steps, the length of the FP8-against-bf16 comparison (issue 16);
`--config.model.fp8.enabled=false` is its bf16 twin.
"""
from automodel_jax.recipes.llm.presets import embedded_default, squad

PRESETS = ("", "llama3.2-1b", "llama3.1-8b", "llama3.2-1b-hellaswag-fp8")


def get_config(preset: str = ""):
    if preset == "llama3.2-1b":
        return squad("runs/llama3.2-1b_squad_sft", "meta-llama/Llama-3.2-1B", global_batch=64, micro_batch=8,
                     seq_len=512, lora_targets=None)
    if preset == "llama3.1-8b":
        return squad("runs/llama3.1-8b_squad_sft", "meta-llama/Llama-3.1-8B", global_batch=32, micro_batch=4,
                     seq_len=1024, lora_targets=None)
    if preset == "llama3.2-1b-hellaswag-fp8":
        cfg = squad("runs/llama3.2-1b_hellaswag_fp8", "meta-llama/Llama-3.2-1B", global_batch=8, micro_batch=8,
                    seq_len=256, lora_targets=None)
        for split in ("train", "validation"):
            cfg.data[split].update(kind="hellaswag", path="Rowan/hellaswag", split=split)
        cfg.train.update(max_steps=300, val_max_samples=64)
        cfg.optim.name = "adam"  # torch.optim.Adam, weight decay 0, no lr scheduler: a constant learning rate
        cfg.optim.schedule.name = "constant"
        cfg.model.fp8.update(enabled=True, recipe="tensorwise", filter_modules=("lm_head",))
        return cfg
    return embedded_default("runs/llama_sft", lora=False, learning_rate=1e-3)
