"""The recipes the VLM config files are built from, so each config file only names its model and sizes.

`embedded_default`: the project's own tiny VLM of the given architecture on its rendered shapes task (CPU, no
network; see embedded.py): LoRA on the language model learns two new instructions over held-out images.
`cord_v2`: NeMo Automodel's VLM CORD-v2 examples (receipt image -> JSON fields as text): LoRA r=8, alpha=32 on the
language model's *_proj layers (vision tower and embeddings frozen), Adam, cosine schedule, bf16 compute.
"""
from __future__ import annotations

from automodel_jax.recipes.vlm.embedded import SEQ_LEN
from automodel_jax.recipes.vlm.finetune import default_config
from automodel_jax.training.optim import link_min_learning_rate

EMBEDDED_MODELS = {"gemma3": "embedded:tiny-gemma3", "qwen2_5_vl": "embedded:tiny-qwen2_5_vl"}


def embedded_default(run_dir: str, model_type: str, *, learning_rate: float = 5e-3):
    cfg = default_config()
    cfg.run_dir = run_dir
    cfg.model.update(path=EMBEDDED_MODELS[model_type], dtype="float32", param_dtype="float32")
    cfg.peft.update(method="lora", r=16, alpha=32.0, target_modules=("*_proj",))
    cfg.data.seq_len = SEQ_LEN[model_type]
    cfg.train.update(global_batch_size=32, micro_batch_size=32, max_steps=300, val_every=100, log_every=20)
    cfg.optim.update(name="adamw", learning_rate=learning_rate, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=20)
    link_min_learning_rate(cfg.optim, 0.1)
    cfg.mesh.fsdp = 1
    return cfg


def cord_v2(run_dir: str, model_path: str, *, data_path: str = "naver-clova-ix/cord-v2", global_batch: int = 32,
            micro_batch: int = 8, seq_len: int = 1024):
    cfg = default_config()
    cfg.run_dir = run_dir
    cfg.model.update(path=model_path, dtype="bfloat16", param_dtype="bfloat16", remat="save_dots")
    cfg.peft.update(method="lora", r=8, alpha=32.0, dropout=0.0, target_modules=("*_proj",))
    for split, name in (("train", "train"), ("validation", "validation")):
        cfg.data[split].update(kind="cord", path=data_path, split=name)
    cfg.data.update(seq_len=seq_len, truncation="truncate")
    cfg.train.update(global_batch_size=global_batch, micro_batch_size=micro_batch, max_steps=1000, val_every=100,
                     val_max_samples=64)
    cfg.optim.update(name="adam", learning_rate=1e-4, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=20)
    link_min_learning_rate(cfg.optim, 0.1)
    cfg.evaluation.update(samples=16, max_new_tokens=128)
    return cfg
