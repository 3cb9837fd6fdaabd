"""Vision-language LoRA fine-tuning of Qwen2.5-VL (`qwen2_5_vl`, Qwen2_5_VLForConditionalGeneration).

Presets: "" (default) = the embedded default: a tiny Qwen2.5-VL (windowed vision transformer, patch merger, M-RoPE
Qwen2 decoder) with its processor, built and pre-trained by the project on rendered shapes, then LoRA on two new
instructions over held-out images (CPU, about 20 minutes the first time on 2 cores, no network; 100% held-out);
"qwen2.5-vl-3b" = Qwen/Qwen2.5-VL-3B-Instruct on CORD-v2 receipts (LoRA r=8 on the language model, vision tower frozen).
"""
from automodel_jax.recipes.vlm.presets import cord_v2, embedded_default

PRESETS = ("", "qwen2.5-vl-3b")


def get_config(preset: str = ""):
    if preset == "qwen2.5-vl-3b":
        return cord_v2("runs/qwen2.5-vl-3b_cord_v2_lora", "Qwen/Qwen2.5-VL-3B-Instruct")
    return embedded_default("runs/qwen2_5_vl_lora", "qwen2_5_vl")
