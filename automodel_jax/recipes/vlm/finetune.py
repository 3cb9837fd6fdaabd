"""Vision-language fine-tuning recipe (LoRA or full SFT) for Gemma 3 and Qwen2.5-VL, the second recipe of NeMo
Automodel (`recipes/vlm/finetune.py` there), run by `python -m automodel_jax.finetune --config configs/gemma3_vl_lora.py`
(the entry point picks this recipe when the config has a `vlm` marker; see `automodel_jax.cli.finetune`).

`run(cfg)` reads top to bottom in named phases, sharing the train loop with the LLM recipe:
  setup       processes and mesh, model (+ adapters, freezing), processor, image-text data and per-model collation,
              checkpoints to resume, optimizer and the jitted steps on declared shardings                -> `Run`
  validate    token-weighted validation loss (automodel_jax.training.trainer)
  train_loop  the jitted step over global batches (automodel_jax.training.trainer)
  finish      final validation and checkpoint, held-out answers and accuracy, plot, HF / PEFT export

Freezing follows NeMo Automodel's `freeze_config`: `model.freeze_vision_tower` (default true),
`model.freeze_embeddings` (default true), `model.freeze_language_model` (default false). Full SFT trains every
parameter outside the frozen groups; LoRA adapts `peft.target_modules` outside them (so, by default, the language
model only; set freeze_vision_tower=false to adapt the vision tower too).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from automodel_jax.checkpoint.export import export_model
from automodel_jax.checkpoint.hf import read_hf_config, resolve_checkpoint_dir
from automodel_jax.config import ConfigError, validate_choice
from automodel_jax.data import DataError, check_vocabulary
from automodel_jax.data.vlm import build_vlm_dataset, conversation_prompts, load_processor, vlm_dataset_defaults
from automodel_jax.data.vlm_batches import make_collator, make_vlm_loader
from automodel_jax.generation import check_context
from automodel_jax.generation.vlm import generate_with_images
from automodel_jax.models.vocab import substituted_token_ids
from automodel_jax.parallel.sharding import check_mesh_fits, check_process_layout
from automodel_jax.peft.lora import apply_lora, lora_defaults
from automodel_jax.training.trainer import (Run, batch_geometry, build_run, check_training_config, load_model, start,
                                            start_label, train_loop, trainer_defaults, validate)

from automodel_jax.recipes.vlm import embedded

log = logging.getLogger("automodel_jax.finetune")

VLM_MODEL_TYPES = ("gemma3", "qwen2_5_vl")
FREEZE_GROUPS = ("vision_tower", "embeddings", "language_model")
# NeMo Automodel's freeze groups as module paths of each architecture (our paths are HF's checkpoint names).
MODULE_GROUPS = {
    "gemma3": dict(vision_tower=("vision_tower",), embeddings=("language_model.model.embed_tokens",),
                   language_model=("language_model",)),
    "qwen2_5_vl": dict(vision_tower=("visual",), embeddings=("model.embed_tokens",),
                       language_model=("model", "lm_head")),
}


def default_config() -> ml_collections.ConfigDict:
    """Every key the recipe reads, with defaults: the embedded tiny Gemma 3 on the rendered shapes task."""
    cfg = trainer_defaults("runs/vlm_finetune")
    cfg.vlm = True  # marks a config of this recipe for the `finetune` entry point
    cfg.model = dict(path="embedded:tiny-gemma3", dtype="bfloat16", param_dtype="float32", remat="none",
                     attention="auto", freeze_vision_tower=True, freeze_embeddings=True,
                     freeze_language_model=False)
    cfg.peft = lora_defaults()
    cfg.data = dict(train=vlm_dataset_defaults("vlm_chat", "embedded:shapes/train", "train"),
                    validation=vlm_dataset_defaults("vlm_chat", "embedded:shapes/validation", "train"),
                    seq_len=128, max_images=1, max_patches=config_dict.placeholder(int), truncation="error",
                    pad_token_id=config_dict.placeholder(int), min_kept_fraction=0.1)
    # Held-out answers: greedy answers to the first `samples` validation prompts, exact-match accuracy.
    cfg.evaluation = dict(samples=64, batch_size=16, max_new_tokens=32, print=4)
    return cfg


def resolve_path(path: str) -> str:
    """A model or data path as given, or the local path of an `embedded:` asset (built on first use; its base model
    is pre-trained by this recipe)."""
    return embedded.resolve(path, default_config, run)


def frozen_module_patterns(model_type: str, cfg) -> tuple[str, ...]:
    """`re:` patterns matching the module paths of the frozen groups (and everything below them)."""
    groups = MODULE_GROUPS[model_type]
    prefixes = [p for g in FREEZE_GROUPS if cfg.model[f"freeze_{g}"] for p in groups[g]]
    return tuple("re:" + re.escape(p) + r"(\..*)?" for p in prefixes)


def check_run_config(cfg) -> None:
    """The recipe's choices and the trainer's settings that need no devices, model or data, before anything is
    built."""
    if not cfg.vlm:
        raise ConfigError("vlm marks a config of the vision-language recipe and is not a switch; remove "
                          "--config.vlm=false, or use an LLM config file (configs/llama_lora.py, ...) for text-only "
                          "fine-tuning")
    validate_choice(cfg, "peft.method", ("lora", "none"))
    validate_choice(cfg, "loss.impl", ("naive", "chunked", "pallas"))
    validate_choice(cfg, "data.truncation", ("truncate", "drop", "error"))
    if cfg.data.max_images < 1:
        raise ConfigError(f"data.max_images must be >= 1, got {cfg.data.max_images}")
    if cfg.peft.method == "none" and all(cfg.model[f"freeze_{g}"] for g in FREEZE_GROUPS):
        raise ConfigError("model.freeze_vision_tower, freeze_embeddings and freeze_language_model are all true: "
                          "full SFT would train nothing but the projector; unfreeze a group or use peft.method=lora")
    check_training_config(cfg)


def setup(cfg, model=None) -> Run:
    """Processes and mesh -> model (+ adapters, freezing) -> processor and data -> checkpoints -> optimizer, state
    and jitted steps. `model`: an already built VLM (benchmarks) instead of loading model.path's weights."""
    check_run_config(cfg)
    started = start(cfg)
    mesh, rules = started.mesh, started.rules

    # Model, processor, adapters and freezing.
    model_path = resolve_path(cfg.model.path)
    hf = read_hf_config(resolve_checkpoint_dir(model_path))
    if hf.get("model_type") not in VLM_MODEL_TYPES:
        raise ConfigError(f"model.path {model_path}: model_type {hf.get('model_type')!r} is not a vision-language "
                          f"model ({', '.join(VLM_MODEL_TYPES)}); use an LLM config (without `vlm`) for it")
    text = hf.get("text_config") or hf
    heads = text.get("num_attention_heads", 8)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    check_mesh_fits(mesh.shape, num_heads=heads, num_kv_heads=text.get("num_key_value_heads") or heads,
                    seq_len=cfg.data.seq_len, batch_rows=cfg.train.micro_batch_size * dp)
    check_process_layout(mesh, rules)
    processor = load_processor(model_path)
    model = load_model(cfg, model_path, started) if model is None else model
    frozen_patterns = frozen_module_patterns(hf["model_type"], cfg)
    lora = cfg.peft.method == "lora"
    if lora:
        apply_lora(model, r=cfg.peft.r, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                   target_modules=cfg.peft.target_modules,
                   exclude_modules=tuple(cfg.peft.exclude_modules) + frozen_patterns, seed=cfg.seed)

    # Data: rows through the processor, per-model collation, the model's host-side inputs.
    seq_len, data_cfg = cfg.data.seq_len, cfg.data
    for split in ("train", "validation"):
        data_cfg[split].path = resolve_path(data_cfg[split].path)
    pad_id = data_cfg.pad_token_id if data_cfg.pad_token_id is not None else processor.tokenizer.pad_token_id
    if pad_id is None:
        raise DataError(f"{model_path}: the tokenizer has no pad token; set data.pad_token_id")
    vocab_size, exempt = model.config.vocab_size, substituted_token_ids(model.config)
    check_vocabulary(processor.tokenizer, vocab_size, pad_id=pad_id, exempt=exempt)
    check_context(model, seq_len, f"data.seq_len {seq_len}", "data.seq_len")
    train_set, val_set = (build_vlm_dataset(data_cfg[split], processor, seq_len, data_cfg.truncation,
                                            data_cfg.min_kept_fraction) for split in ("train", "validation"))
    check_vocabulary(processor.tokenizer, vocab_size, datasets=(train_set, val_set), exempt=exempt)
    max_patches = data_cfg.max_patches or max(train_set.max_patches, val_set.max_patches)
    collate = make_collator(train_set, seq_len=seq_len, pad_id=pad_id, max_images=data_cfg.max_images,
                            max_patches=max_patches)
    accum, process_batch = batch_geometry(cfg, mesh)
    loader = make_vlm_loader(train_set, collate, batch_size=process_batch, seed=cfg.seed,
                             shard_index=jax.process_index(), shard_count=jax.process_count(),
                             drop_remainder=False)
    total_steps = cfg.train.max_steps or loader.batches_in_epochs(cfg.train.num_epochs)
    model_cls, model_config = type(model), model.config

    def prepare(batch: dict) -> dict:
        return model_cls.host_batch(model_config, batch)

    val_rows = len(val_set) if not cfg.train.val_max_samples else min(cfg.train.val_max_samples, len(val_set))
    val_loader = make_vlm_loader([val_set[i] for i in range(val_rows)], collate,
                                 batch_size=max(cfg.train.micro_batch_size * dp // jax.process_count(), 1), seed=0,
                                 shuffle=False, num_epochs=1, shard_index=jax.process_index(),
                                 shard_count=jax.process_count(), drop_remainder=False) if val_rows else []
    val_batches = [prepare(b) for b in val_loader]
    example = prepare(collate([train_set[0]]))
    batch_ranks = {k: v.ndim - 1 for k, v in example.items()}

    # Checkpoints, optimizer, state and jitted steps.
    return build_run(cfg, started, model=model, lora=lora, model_path=model_path, tokenizer=processor, loader=loader,
                     val_batches=val_batches, accum=accum, total_steps=total_steps, max_segments=1,
                     frozen=() if lora else frozen_patterns, batch_ranks=batch_ranks, prepare=prepare)


def held_out_answers(run: Run, title: str) -> float:
    """Greedy answers to the first evaluation.samples validation prompts; prints a few and the exact-match accuracy
    (answers compared after stripping whitespace). Every process takes part; only process 0 prints."""
    cfg = run.cfg
    if cfg.evaluation.samples < 1:
        return float("nan")
    prompts = conversation_prompts(cfg.data.validation, cfg.evaluation.samples)
    model_now = run.model()
    processor, answers = run.tokenizer, []
    for first in range(0, len(prompts), cfg.evaluation.batch_size):
        chunk = prompts[first:first + cfg.evaluation.batch_size]
        texts = [processor.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
                 for p in chunk]
        inputs = processor(text=texts, images=[p["images"] for p in chunk], padding=True, add_special_tokens=False,
                           return_tensors="np")
        new = generate_with_images(model_now, processor.tokenizer, dict(inputs),
                                   max_new_tokens=cfg.evaluation.max_new_tokens)
        answers += [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    correct = np.mean([a.strip() == p["answer"].strip() for a, p in zip(answers, prompts)])
    with contextlib.nullcontext() if run.primary else contextlib.redirect_stdout(io.StringIO()):
        print(f"--- held-out answers {title} ---", flush=True)
        for p, a in list(zip(prompts, answers))[:cfg.evaluation.print]:
            print(f"{p['question']!r} -> {a!r} (expected {p['answer']!r})", flush=True)
        print(f"held-out accuracy {title}: {correct:.1%} of {len(prompts)}", flush=True)
    run.logger.log(int(run.state["step"]), {"accuracy": float(correct)}, "val")
    return float(correct)


def finish(run: Run, first_val: float, first_accuracy: float, first_label: str = "before") -> dict:
    """Final validation and checkpoint, held-out answers, loss plot, export; the run's results. `first_label`: what
    the summary calls the state the first values were measured on (see trainer.start_label)."""
    cfg, total_steps = run.cfg, run.total_steps
    final_val = validate(run, total_steps)
    run.checkpoints.save(total_steps, run.state, run.loader, final_val, final=True)
    accuracy = held_out_answers(run, "after fine-tuning")
    if run.primary:
        print(f"validation loss: {first_val:.4f} {first_label} -> {final_val:.4f} after {total_steps} steps; held-out "
              f"accuracy {first_accuracy:.1%} -> {accuracy:.1%}", flush=True)
    run.logger.plot_losses()
    run.logger.close()
    run.checkpoints.close()
    trained = run.model()
    if run.export_to is not None:
        export_model(trained, run.export_to, base_model_name_or_path=run.model_path,
                     merge_lora=cfg.export.merge_lora, overwrite=cfg.export.overwrite)
    return dict(val_loss_before=first_val, val_loss_after=final_val, steps=total_steps, model=trained,
                accuracy_before=first_accuracy, accuracy_after=accuracy)


def run(cfg) -> dict:
    """Train as `cfg` says; returns validation loss and held-out accuracy before/after, steps, the trained model."""
    with contextlib.closing(setup(cfg)) as run_:  # checkpoint saves and writers end on every way out
        step = int(run_.state["step"])
        first_val = validate(run_, step)
        first_accuracy = held_out_answers(run_, "before fine-tuning" if step == 0 else start_label(step))
        train_loop(run_)
        return finish(run_, first_val, first_accuracy, start_label(step))
