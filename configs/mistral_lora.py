"""LoRA fine-tuning of Mistral models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
all *_proj layers; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "mistral-7b" = mistralai/Mistral-7B-Instruct-v0.3: 32 layers, hidden 4096, 32 query / 8 KV
heads, vocab 32,768, no sliding window.
"""
from automodel_jax.finetune import default_config

MODELS = {"mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "mistral-7b"
    cfg = default_config()  # its data: SQuAD train / validation from the Hub
    cfg.run_dir = f"runs/{name}_squad_lora"
    cfg.model.path = MODELS[name]
    cfg.peft.update(method="lora", r=8, alpha=32.0, dropout=0.0, target_modules=("*_proj",))
    cfg.data.seq_len = 1024
    cfg.train.update(global_batch_size=32, micro_batch_size=4, max_steps=1000, val_every=100, val_max_samples=512)
    cfg.optim.update(name="adam", learning_rate=1e-5, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=0, min_learning_rate=1e-6)
    return cfg
