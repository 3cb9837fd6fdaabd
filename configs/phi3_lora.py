"""LoRA fine-tuning of Phi-3 models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
qkv_proj, o_proj, gate_up_proj, down_proj; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "phi3-mini-4k" = microsoft/Phi-3-mini-4k-instruct: 32 layers, hidden 3072, 32 query / 32 KV
heads, fused qkv_proj and gate_up_proj, vocab 32,064, 4k context.
"""
from automodel_jax.finetune import default_config

MODELS = {"phi3-mini-4k": "microsoft/Phi-3-mini-4k-instruct"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "phi3-mini-4k"
    cfg = default_config()  # its data: SQuAD train / validation from the Hub
    cfg.run_dir = f"runs/{name}_squad_lora"
    cfg.model.path = MODELS[name]
    cfg.peft.update(method="lora", r=8, alpha=32.0, dropout=0.0,
                    target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    cfg.data.seq_len = 512
    cfg.train.update(global_batch_size=32, micro_batch_size=4, max_steps=1000, val_every=100, val_max_samples=512)
    cfg.optim.update(name="adam", learning_rate=1e-5, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=0, min_learning_rate=1e-6)
    return cfg
