"""Vision-language LoRA fine-tuning of Gemma 3 (`gemma3`, Gemma3ForConditionalGeneration).

Presets: "" (default) = the embedded default: a tiny Gemma 3 (SigLIP tower, pooled projector, Gemma 3 decoder) with
its processor, built and pre-trained by the project on rendered shapes, then LoRA on two new instructions over
held-out images (CPU, about 14 minutes the first time on 2 cores, no network; 100% held-out); "gemma3-4b" =
google/gemma-3-4b-it on CORD-v2 receipts, as NeMo Automodel's Gemma 3 VL 4B CORD-v2 PEFT example (LoRA r=8 on the language model, vision tower frozen).
"""
from automodel_jax.recipes.vlm.presets import cord_v2, embedded_default

PRESETS = ("", "gemma3-4b")


def get_config(preset: str = ""):
    if preset == "gemma3-4b":
        return cord_v2("runs/gemma3-4b_cord_v2_lora", "google/gemma-3-4b-it")
    return embedded_default("runs/gemma3_vl_lora", "gemma3")
