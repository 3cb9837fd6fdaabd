"""LLM fine-tuning recipe (LoRA or full SFT), run by `python -m automodel_jax.finetune --config FILE[:preset]`.

`run(cfg)` reads top to bottom in named phases, each a function `bench/` can drive on its own:
  setup       processes and mesh, model (+ adapters), tokenizer, data, checkpoints to resume, optimizer and the
              jitted steps on declared shardings                                                   -> `Run`
  validate    token-weighted validation loss of the current parameters
  train_loop  the jitted step over global batches, metrics read one step behind (no host sync), validation and
              asynchronous checkpoints on their cadence, an optional profiler trace
  finish      final validation and checkpoint, generations, plot, HF / PEFT export, evaluation
"""
from __future__ import annotations

import contextlib
import io
import json
import logging

import jax
import ml_collections

from automodel_jax.checkpoint.export import export_model
from automodel_jax.checkpoint.hf import read_hf_config, resolve_checkpoint_dir
from automodel_jax.config import ConfigError, validate_choice
from automodel_jax.data import (build_dataset, check_dataset_config, check_vocabulary, data_defaults, load_rows,
                                make_loader, resolve_pad_id)
from automodel_jax.generation import check_context, enforced_context
from automodel_jax.losses.cross_entropy import IMPLS as LOSS_IMPLS
from automodel_jax.models.base import family_config
from automodel_jax.models.fp8 import MIN_COMPUTE_CAPABILITY, fp8_unsupported
from automodel_jax.models.layers import apply_fp8
from automodel_jax.parallel.sharding import check_mesh_fits, check_process_layout
from automodel_jax.peft.lora import apply_lora, lora_defaults
from automodel_jax.training import loop, plan, plan_run
from automodel_jax.training.trainer import (Run, batch_geometry, build_run, check_training_config, load_model, start,
                                            start_label, train_loop, trainer_defaults, validate)

from automodel_jax.recipes.llm import embedded

log = logging.getLogger("automodel_jax.finetune")
FP8_RECIPES = ("tensorwise", "delayed")  # current scaling, or Transformer Engine's delayed scaling (models.fp8)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def default_config() -> ml_collections.ConfigDict:
    """Every key the recipe reads, with defaults; config files start from this and set their presets."""
    cfg = trainer_defaults("runs/finetune")
    # remat: activation checkpointing per decoder layer (none, full, save_dots). scan_layers: the decoder layers as
    # one stacked module run by a scan, so XLA compiles one layer instead of all of them (much faster compiles of deep
    # models); needs identical layers (not Gemma 2/3 or Qwen2 with sliding windows on some layers), and LoRA / FP8
    # patterns that take every layer or none.
    cfg.model = dict(path="embedded:tiny-llama", dtype="bfloat16", param_dtype="float32", remat="none",
                     scan_layers=False, attention="auto")
    # FP8 matmuls in the decoder's Linear layers (not lm_head), E4M3 forward / E5M2 backward, one scale per tensor:
    # recipe "tensorwise" (current scaling) or "delayed" (from the amax history of the last amax_history_len steps,
    # kept in the train state and checkpoints; 1024 as Transformer Engine and Flax); filter_modules: module patterns
    # kept in model.dtype; emulate: allow it on CPU (tests only).
    cfg.model.fp8 = dict(enabled=False, recipe="tensorwise", amax_history_len=1024, filter_modules=(), emulate=False)
    cfg.peft = lora_defaults()
    cfg.data = data_defaults()
    # Evaluation at the end of training: "none", "hellaswag" (acc, acc_norm) or "squad" (exact match, F1).
    cfg.evaluation = dict(task="none", data="", split="validation", limit=200, batch_size=8)
    # Mesh, activation checkpointing, loss and micro-batch chosen (auto) or checked (check) before weights load.
    cfg.plan = plan.plan_defaults()
    return cfg


def resolve_path(path: str) -> str:
    """A model or data path as given, or the local path of an `embedded:` asset (built on first use; its base model
    is pre-trained by this recipe)."""
    return embedded.resolve(path, default_config, run)


def check_parallelism(cfg, mesh, rules, model_path: str) -> None:
    """The mesh against the model's heads, the sequence, the batch and the processes, before loading or compiling."""
    hf = read_hf_config(resolve_checkpoint_dir(model_path))
    heads = hf["num_attention_heads"]
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    check_mesh_fits(mesh.shape, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                    seq_len=cfg.data.seq_len, batch_rows=cfg.train.micro_batch_size * dp)
    check_process_layout(mesh, rules)


def check_scan_layers(cfg, model_path: str) -> None:
    """With model.scan_layers on, ValueError (one line naming the key and the fix) unless the model's decoder layers
    are identical, before planning or loading anything."""
    if cfg.model.scan_layers:
        directory = resolve_checkpoint_dir(model_path)
        family_config(read_hf_config(directory), str(directory / "config.json"), dict(scan_layers=True))


def check_fp8_devices(cfg) -> None:
    """With model.fp8 on, the run's devices (checked once they are known, so that --print-config and launchers work
    on machines without them): ConfigError unless they have FP8 matmuls, or are CPUs and model.fp8.emulate is on."""
    if not cfg.model.fp8.enabled:
        return
    device = jax.devices()[0]
    why = fp8_unsupported(device)
    if why and not (device.platform == "cpu" and cfg.model.fp8.emulate):
        emulation = " (on CPU, model.fp8.emulate=true emulates FP8 for tests)" if device.platform == "cpu" else ""
        raise ConfigError(f"model.fp8.enabled: {why}; run on an NVIDIA GPU of compute capability "
                          f"{MIN_COMPUTE_CAPABILITY} or newer (H100, H200, L40S, B200) or set model.fp8.enabled=false"
                          f"{emulation}")


def check_run_config(cfg) -> None:
    """The recipe's choices and the trainer's settings that need no devices, model or data, before anything is built
    (so that a bad one fails at once, not after the planner compiled the run)."""
    validate_choice(cfg, "peft.method", ("lora", "none"))
    fp8 = cfg.model.fp8
    recipe = validate_choice(cfg, "model.fp8.recipe", FP8_RECIPES)
    if fp8.enabled and recipe == "delayed" and fp8.amax_history_len < 1:  # unused by other recipes, or with FP8 off
        raise ConfigError(f"model.fp8.amax_history_len must be >= 1 (steps of amax history for delayed scaling; "
                          f"Transformer Engine's default is 1024), got {fp8.amax_history_len}")
    validate_choice(cfg, "loss.impl", LOSS_IMPLS)
    for split in ("train", "validation"):
        check_dataset_config(cfg.data[split], f"data.{split}")
    plan.check_plan_config(cfg.plan)
    check_training_config(cfg)
    if validate_choice(cfg, "evaluation.task", ("none", "hellaswag", "squad")) != "none" and not cfg.evaluation.data:
        raise ConfigError("evaluation.data is empty; point it at the task's rows (a local file, saved dataset or "
                          "Hub name), or set evaluation.task=none")


def check_model_fits(cfg, model, tokenizer, pad_id: int) -> None:
    """What the run will feed the model against what it can take, before any data is tokenized: every token id the
    tokenizer can emit and the pad id inside the embedding table, and seq_len and each sample prompt plus
    train.sample_max_new_tokens inside its context. DataError / ValueError naming the setting otherwise."""
    check_vocabulary(tokenizer, model.config.vocab_size, pad_id=pad_id)
    check_context(model, cfg.data.seq_len, f"data.seq_len {cfg.data.seq_len}", "data.seq_len")
    new = cfg.train.sample_max_new_tokens
    for i, prompt in enumerate(cfg.train.sample_prompts):
        n = len(tokenizer(prompt)["input_ids"])
        check_context(model, n + new, f"train.sample_prompts[{i}] ({n} tokens) + train.sample_max_new_tokens {new}",
                      "train.sample_max_new_tokens", others=n)


def setup(cfg, model=None) -> Run:
    """Processes and mesh -> model (+ adapters) -> data -> checkpoints -> optimizer, state and jitted steps.

    `model`: an already built model (benchmarks: random init of a published shape) instead of loading model.path's
    weights; the tokenizer still comes from model.path.
    """
    check_run_config(cfg)
    if model is not None and cfg.plan.mode == "auto":
        raise ConfigError("setup() was given a built model, whose remat plan.mode=auto cannot choose; plan first "
                          "(training.plan.make_plan), build the model with the chosen settings, and set plan.mode=off")
    started = start(cfg)
    check_fp8_devices(cfg)
    if cfg.plan.mode == "auto":
        plan.required_device_memory(cfg.plan)  # before an embedded model is built

    # Plan (cfg.plan: check that the run fits, or choose its mesh, remat, loss and micro-batch), model, adapters.
    model_path = resolve_path(cfg.model.path)
    if model is None:
        check_scan_layers(cfg, model_path)
    started = plan_run.prepare_run(cfg, started, model_path)
    mesh, rules = started.mesh, started.rules
    check_parallelism(cfg, mesh, rules, model_path)
    tokenizer = load_tokenizer(model_path)
    model = load_model(cfg, model_path, started) if model is None else model
    fp8 = cfg.model.fp8
    if fp8.enabled:
        history = fp8.amax_history_len if fp8.recipe == "delayed" else None
        log.info("FP8 (%s) matmuls in %d Linear layers", fp8.recipe,
                 len(apply_fp8(model, tuple(fp8.filter_modules), amax_history_len=history)))
    lora = cfg.peft.method == "lora"
    if lora:
        apply_lora(model, r=cfg.peft.r, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                   target_modules=cfg.peft.target_modules, exclude_modules=cfg.peft.exclude_modules, seed=cfg.seed)

    # Data.
    seq_len, data_cfg = cfg.data.seq_len, cfg.data
    for split in ("train", "validation"):
        data_cfg[split].path = resolve_path(data_cfg[split].path)
    pad_id = resolve_pad_id(tokenizer, data_cfg.pad_token_id, data_cfg.pad_with_eos)
    check_model_fits(cfg, model, tokenizer, pad_id)
    context = enforced_context(model)
    train_set, val_set = (build_dataset(data_cfg[split], tokenizer, seq_len, data_cfg.truncation,
                                        data_cfg.min_kept_fraction, context) for split in ("train", "validation"))
    check_vocabulary(tokenizer, model.config.vocab_size, datasets=(train_set, val_set))
    accum, process_batch = batch_geometry(cfg, mesh)
    loader = make_loader(train_set, batch_size=process_batch, seq_len=seq_len, pad_id=pad_id, seed=cfg.seed,
                         shard_index=jax.process_index(), shard_count=jax.process_count(),
                         packing=data_cfg.packing, shuffle=data_cfg.shuffle, drop_remainder=False)
    total_steps = cfg.train.max_steps or loader.batches_in_epochs(cfg.train.num_epochs)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    val_batches = loop.validation_batches(val_set, cfg.train.val_max_samples, cfg.train.micro_batch_size * dp,
                                          seq_len, pad_id)

    # Checkpoints, optimizer, state and jitted steps.
    return build_run(cfg, started, model=model, lora=lora, model_path=model_path, tokenizer=tokenizer, loader=loader,
                     val_batches=val_batches, accum=accum, total_steps=total_steps,
                     max_segments=loader.plan.max_segments)


def generations(run: Run, title: str) -> None:
    """Greedy continuations of train.sample_prompts. Every process takes part (the parameters are sharded over all
    of them); only process 0 prints."""
    cfg = run.cfg
    if cfg.train.sample_prompts:
        model_now = run.model()
        with contextlib.nullcontext() if run.primary else contextlib.redirect_stdout(io.StringIO()):
            loop.print_generations(title, model_now, run.tokenizer, cfg.train.sample_prompts,
                                   cfg.train.sample_max_new_tokens)


def finish(run: Run, first_val: float, first_label: str = "before") -> dict:
    """Final validation and checkpoint, generations, loss plot, export and evaluation; the run's results.
    `first_label`: what the summary calls the state `first_val` was measured on (see trainer.start_label)."""
    cfg, total_steps = run.cfg, run.total_steps
    final_val = validate(run, total_steps)
    run.checkpoints.save(total_steps, run.state, run.loader, final_val, final=True)
    generations(run, "after fine-tuning")
    if run.primary:
        print(f"validation loss: {first_val:.4f} {first_label} -> {final_val:.4f} after {total_steps} steps",
              flush=True)
    run.logger.plot_losses()
    run.logger.close()
    run.checkpoints.close()
    trained = run.model()
    if run.export_to is not None:
        export_model(trained, run.export_to, base_model_name_or_path=run.model_path,
                     merge_lora=cfg.export.merge_lora, overwrite=cfg.export.overwrite,
                     chat_template=run.checkpoints.meta["chat_template"])
    scores = {}
    if cfg.evaluation.task != "none":
        from automodel_jax.evaluation import evaluate
        rows = load_rows(cfg.evaluation.data, cfg.evaluation.split, cfg.evaluation.limit)
        scores = evaluate(trained, run.tokenizer, cfg.evaluation.task, rows, cfg.evaluation.limit,
                          cfg.evaluation.batch_size)
        if run.primary:
            print(f"evaluation {cfg.evaluation.task}: {scores}", flush=True)
            with open(run.run_dir / "evaluation.json", "w") as f:
                json.dump(scores, f, indent=2)
    return dict(val_loss_before=first_val, val_loss_after=final_val, steps=total_steps, model=trained,
                evaluation=scores)


def run(cfg) -> dict:
    """Train as `cfg` says; returns validation loss before/after, steps done, the trained model and evaluation.
    Running out of device memory is one line naming the plan's figures (`plan_run.explained_out_of_memory`)."""
    with plan_run.explained_out_of_memory(cfg, lambda: resolve_path(cfg.model.path)), \
            contextlib.closing(setup(cfg)) as run_:  # checkpoint saves and writers end on every way out
        step = int(run_.state["step"])
        first_val = validate(run_, step)
        generations(run_, "before fine-tuning" if step == 0 else start_label(step))
        train_loop(run_)
        return finish(run_, first_val, start_label(step))
