"""Export a trained model or Orbax checkpoint for Hugging Face users.

A LoRA run exports a PEFT adapter directory (for `peft.PeftModel.from_pretrained`), or with --merge-lora the base model
with the adapters folded in; a full fine-tuning run exports the whole model. Full models are HF checkpoints (sharded
safetensors, index, config, generation config, tokenizer files) for `transformers.AutoModelForCausalLM`, or for a VLM
its transformers class (Gemma3ForConditionalGeneration, Qwen2_5_VLForConditionalGeneration) with the processor files;
VLM adapters use the module names PEFT gives transformers' model (`peft_io.PEFT_MODULE_NAMES`).
"""
from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx
from ml_collections import config_dict

from automodel_jax.checkpoint.hf import refuse_non_empty, save_pretrained
from automodel_jax.checkpoint.orbax_io import load_checkpoint_model
from automodel_jax.checkpoint.peft_io import save_peft_adapter
from automodel_jax.config import validate_choice
from automodel_jax.models.params import flatten, pure_dict
from automodel_jax.peft.lora import adapters, merged_kernels


def export_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        when="final",  # "final": export when training ends; "never"
        merge_lora=False,  # LoRA: a merged full model instead of a PEFT adapter
        dir=config_dict.placeholder(str),  # default run_dir/export
        overwrite=False,
    ))


def export_dir(cfg) -> Path | None:
    """Where the recipe exports (None: it does not); checked now, before training."""
    if validate_choice(cfg, "export.when", ("final", "never")) == "never":
        return None
    return refuse_non_empty(cfg.export.dir or Path(cfg.run_dir) / "export", cfg.export.overwrite,
                            "set export.dir to another directory, export.overwrite=true or export.when=never",
                            what="export directory")


def export_model(model: nnx.Module, out_dir, *, base_model_name_or_path: str, merge_lora: bool = False,
                 overwrite: bool = False, max_shard_size: int | str = "5GB", chat_template: str | None = None) -> Path:
    """A PEFT adapter (LoRA, unmerged) or an HF checkpoint (full model, or LoRA merged into the base); either has the
    base's tokenizer files, with `chat_template` (the one training used, if it replaced the tokenizer's) as theirs."""
    if adapters(model) and not merge_lora:
        return save_peft_adapter(model, out_dir, base_model_name_or_path, overwrite=overwrite,
                                 chat_template=chat_template)
    params = flatten(pure_dict(model, nnx.Param))
    params.update(merged_kernels(model))
    save_pretrained(model, out_dir, overwrite=overwrite, max_shard_size=max_shard_size, params=params,
                    chat_template=chat_template)
    return Path(out_dir)


def export_checkpoint(checkpoint, out_dir, *, merge_lora: bool = False, overwrite: bool = False,
                      max_shard_size: int | str = "5GB", mesh=None) -> Path:
    """Export an Orbax checkpoint (a run directory's latest, or a step directory) as `export_model` does, with the
    chat template its run trained with (recorded in the checkpoint's meta)."""
    refuse_non_empty(out_dir, overwrite, "choose another directory or pass --overwrite to replace it",
                     what="export directory")
    model, meta = load_checkpoint_model(checkpoint, mesh=mesh)
    return export_model(model, out_dir, base_model_name_or_path=meta["model_path"],
                        merge_lora=merge_lora, overwrite=overwrite, max_shard_size=max_shard_size,
                        chat_template=meta.get("chat_template"))
