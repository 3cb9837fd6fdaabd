"""LoRA fine-tuning of Gemma 3 (text) models on SQuAD, as NeMo Automodel's *_squad_peft recipes (LoRA r=8, alpha=32 on
all *_proj layers; Adam lr 1e-5 cosine to 1e-6).

Presets: "" (default) = "gemma3-1b" = google/gemma-3-1b-it (HF model_type gemma3_text): 26 layers, hidden 1152,
4 query / 1 KV heads of dim 256, vocab 262,144, five 512-token sliding-window layers per global one.
"""
from automodel_jax.finetune import default_config

MODELS = {"gemma3-1b": "google/gemma-3-1b-it"}
PRESETS = ("", *MODELS)


def get_config(preset: str = ""):
    name = preset or "gemma3-1b"
    cfg = default_config()  # its data: SQuAD train / validation from the Hub
    cfg.run_dir = f"runs/{name}_squad_lora"
    cfg.model.path = MODELS[name]
    cfg.peft.update(method="lora", r=8, alpha=32.0, dropout=0.0, target_modules=("*_proj",))
    cfg.data.seq_len = 512
    cfg.train.update(global_batch_size=64, micro_batch_size=8, max_steps=1000, val_every=100, val_max_samples=512)
    cfg.optim.update(name="adam", learning_rate=1e-5, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=0, min_learning_rate=1e-6)
    return cfg
