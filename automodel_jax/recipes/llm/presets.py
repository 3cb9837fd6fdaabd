"""The two recipes the config files are built from, so each config file only names its model and sizes.

`embedded_default`: the project's own small Llama on its held-out word task (CPU, no network; see embedded.py).
`squad`: NeMo Automodel's *_squad(_peft) recipes: SQuAD, lr 1e-5 cosine to 1e-6 (a tenth of the learning rate, also
when it is overridden), validation every 100 steps on 512 samples; LoRA r=8, alpha=32 on the given targets (Adam), or
full SFT (AdamW, bf16 compute over fp32 master weights).
"""
from __future__ import annotations

from automodel_jax.recipes.llm.finetune import default_config
from automodel_jax.training.optim import link_min_learning_rate

EMBEDDED_PROMPTS = ("caps planet = ", "next jazzy = ", "caps zebra = ", "next hello = ")


def embedded_default(run_dir: str, *, lora: bool, learning_rate: float):
    cfg = default_config()
    cfg.run_dir = run_dir
    cfg.peft.method = "lora" if lora else "none"
    cfg.peft.update(r=16, alpha=32.0, target_modules=("*_proj",))
    cfg.model.update(path="embedded:tiny-llama", dtype="float32", param_dtype="float32")
    for split in ("train", "validation"):
        cfg.data[split].update(kind="instruction", path=f"embedded:word-tasks/{split}",
                               prompt_template="{instruction} = ")
        cfg.data[split].columns = dict(instruction="instruction", answer="output")
    cfg.data.seq_len = 32
    cfg.train.update(global_batch_size=32, micro_batch_size=32, max_steps=400, val_every=100, log_every=20,
                     sample_prompts=EMBEDDED_PROMPTS, sample_max_new_tokens=10)
    cfg.optim.update(name="adamw", learning_rate=learning_rate, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=20)
    link_min_learning_rate(cfg.optim, 0.1)
    cfg.mesh.fsdp = 1
    return cfg


def squad(run_dir: str, model_path: str, *, global_batch: int, micro_batch: int, seq_len: int,
          lora_targets: tuple[str, ...] | None = ("*_proj",)):
    """lora_targets=None: full-parameter SFT."""
    cfg = default_config()  # its data: SQuAD train / validation from the Hub
    cfg.run_dir = run_dir
    cfg.model.path = model_path
    cfg.data.seq_len = seq_len
    cfg.train.update(global_batch_size=global_batch, micro_batch_size=micro_batch, max_steps=1000, val_every=100,
                     val_max_samples=512)
    if lora_targets is None:
        cfg.peft.method = "none"
        cfg.model.update(dtype="bfloat16", param_dtype="float32")
        cfg.optim.update(name="adamw", learning_rate=1e-5, weight_decay=0.0)
    else:
        cfg.peft.update(method="lora", r=8, alpha=32.0, dropout=0.0, target_modules=tuple(lora_targets))
        cfg.optim.update(name="adam", learning_rate=1e-5, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=0)
    link_min_learning_rate(cfg.optim, 0.1)
    return cfg
