"""Full-parameter SFT of Llama-family models (every weight trained; peft.method="none").

Presets: "" (default) = the embedded default (the project's own small Llama and held-out word task, float32 on a
laptop CPU, no network); "llama3.2-1b" = NeMo Automodel's llama3_2_1b_squad (global batch 64, local batch 8, lr 1e-5
cosine to 1e-6, SQuAD) with AdamW and bfloat16 compute over float32 master weights; "llama3.1-8b" likewise, sharded
over all devices (FSDP).
"""
from automodel_jax.finetune import default_config

PRESETS = ("", "llama3.2-1b", "llama3.1-8b")


def get_config(preset: str = ""):
    cfg = default_config()
    cfg.peft.method = "none"
    if preset == "":
        cfg.run_dir = "runs/llama_sft"
        cfg.model.update(path="embedded:tiny-llama", dtype="float32", param_dtype="float32")
        for split in ("train", "validation"):
            cfg.data[split].update(kind="instruction", path=f"embedded:word-tasks/{split}",
                                   prompt_template="{instruction} = ")
            cfg.data[split].columns = dict(instruction="instruction", answer="output")
        cfg.data.seq_len = 32
        cfg.train.update(global_batch_size=32, micro_batch_size=32, max_steps=400, val_every=100, log_every=20,
                         sample_prompts=("caps planet = ", "next jazzy = ", "caps zebra = ", "next hello = "),
                         sample_max_new_tokens=10)
        cfg.optim.update(name="adamw", learning_rate=1e-3, weight_decay=0.0)
        cfg.optim.schedule.update(name="cosine", warmup_steps=20, min_learning_rate=1e-4)
        cfg.mesh.fsdp = 1
        return cfg
    # SQuAD (train / validation from the Hub) is default_config()'s data.
    cfg.model.update(dtype="bfloat16", param_dtype="float32")
    cfg.train.update(val_every=100, val_max_samples=512)
    cfg.optim.update(name="adamw", learning_rate=1e-5, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=0, min_learning_rate=1e-6)
    if preset == "llama3.2-1b":
        cfg.run_dir = "runs/llama3.2-1b_squad_sft"
        cfg.model.path = "meta-llama/Llama-3.2-1B"
        cfg.train.update(global_batch_size=64, micro_batch_size=8, max_steps=1000)
        cfg.data.seq_len = 512
    elif preset == "llama3.1-8b":
        cfg.run_dir = "runs/llama3.1-8b_squad_sft"
        cfg.model.path = "meta-llama/Llama-3.1-8B"
        cfg.train.update(global_batch_size=32, micro_batch_size=4, max_steps=1000)
        cfg.data.seq_len = 1024
    return cfg
