"""Fine-tuning recipe (LoRA or full SFT): `python -m automodel_jax.finetune --config configs/llama_lora.py[:preset]`.

Reads top to bottom: config -> processes and mesh -> model (+ adapters) -> data -> optimizer and jitted steps ->
restore -> train loop (validation, checkpoints) -> final validation, generations, export, plot.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from automodel_jax import embedded
from automodel_jax.checkpoint.hf import read_hf_config, resolve_checkpoint_dir
from automodel_jax.checkpoint.orbax_io import TrainCheckpoints, checkpoint_defaults
from automodel_jax.cli import BAD_INPUT, exit_code
from automodel_jax.config import ConfigError, parse_config, save_config, validate_choice
from automodel_jax.data import build_dataset, data_defaults, load_rows, make_loader, resolve_pad_id
from automodel_jax.export import export_defaults, export_dir, export_model
from automodel_jax.launcher.distributed import DistributedInitError, describe_topology, initialize_distributed
from automodel_jax.models import AutoModelForCausalLM
from automodel_jax.parallel.sharding import check_mesh_fits, check_process_layout, mesh_from_config
from automodel_jax.peft.lora import apply_lora, lora_defaults
from automodel_jax.training import loop
from automodel_jax.training.loop import TrainingError
from automodel_jax.training.metrics import MetricsLogger, wandb_defaults
from automodel_jax.training.optim import build_optimizer, optim_defaults
from automodel_jax.training.step import (compile_steps, init_state, make_eval_step, make_train_step, split_model,
                                         tree_shardings)

log = logging.getLogger("automodel_jax.finetune")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def default_config() -> ml_collections.ConfigDict:
    """Every key the recipe reads, with defaults; config files start from this and set their presets."""
    from ml_collections import config_dict
    cfg = ml_collections.ConfigDict()
    cfg.run_dir = "runs/finetune"
    cfg.seed = 0
    cfg.model = dict(path="embedded:tiny-llama", dtype="bfloat16", param_dtype="float32", remat="none",
                     attention="auto")
    cfg.peft = lora_defaults()
    cfg.data = data_defaults()
    cfg.train = dict(global_batch_size=32, micro_batch_size=8, max_steps=config_dict.placeholder(int),
                     num_epochs=1, log_every=10, val_every=100, val_max_samples=config_dict.placeholder(int),
                     sample_prompts=(), sample_max_new_tokens=32)
    cfg.optim = optim_defaults()
    cfg.loss = dict(impl="chunked", chunk_size=config_dict.placeholder(int))  # None: per-impl default
    cfg.mesh = dict(data=1, fsdp=-1, tensor=1, context=1, zero3_over_data=False)
    cfg.logging = dict(tensorboard=True, wandb=wandb_defaults())
    cfg.checkpoint = checkpoint_defaults()
    cfg.export = export_defaults()
    cfg.distributed = dict(timeout_s=300)
    # Evaluation at the end of training: "none", "hellaswag" (acc, acc_norm) or "squad" (exact match, F1).
    cfg.evaluation = dict(task="none", data="", split="validation", limit=200, batch_size=8)
    return cfg


def batch_geometry(cfg, mesh) -> tuple[int, int]:
    """(gradient-accumulation steps, per-process batch) from global and micro batch sizes (NeMo Automodel's way)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if global_batch % (micro * dp):
        raise ConfigError(f"train.global_batch_size {global_batch} must be a multiple of train.micro_batch_size "
                          f"{micro} x data-parallel size {dp}")
    if global_batch % jax.process_count():
        raise ConfigError(f"train.global_batch_size {global_batch} must be divisible by the process count "
                          f"{jax.process_count()}")
    return global_batch // (micro * dp), global_batch // jax.process_count()


def check_parallelism(cfg, mesh, rules, model_path: str) -> None:
    """The mesh against the model's heads, the sequence, the batch and the processes, before loading or compiling."""
    hf = read_hf_config(resolve_checkpoint_dir(model_path))
    heads = hf["num_attention_heads"]
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    check_mesh_fits(mesh.shape, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                    seq_len=cfg.data.seq_len, batch_rows=cfg.train.micro_batch_size * dp)
    check_process_layout(mesh, rules)


def run(cfg) -> dict:
    """Train as `cfg` says; returns validation loss before/after, steps done and the trained model."""
    validate_choice(cfg, "peft.method", ("lora", "none"))
    validate_choice(cfg, "loss.impl", ("naive", "chunked", "pallas"))
    if validate_choice(cfg, "evaluation.task", ("none", "hellaswag", "squad")) != "none" and not cfg.evaluation.data:
        raise ConfigError("evaluation.data is empty; point it at the task's rows (a local file, saved dataset or "
                          "Hub name), or set evaluation.task=none")
    export_to = export_dir(cfg)
    initialize_distributed(cfg.distributed.timeout_s)
    primary = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    if primary:
        save_config(cfg, run_dir)
    mesh, rules = mesh_from_config(cfg.mesh)
    describe_topology(mesh)

    # Model, tokenizer, adapters.
    model_path = embedded.resolve(cfg.model.path)
    check_parallelism(cfg, mesh, rules, model_path)
    tokenizer = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype,
                                                 mesh=mesh, remat=cfg.model.remat,
                                                 attention_impl=cfg.model.attention)
    lora = cfg.peft.method == "lora"
    if lora:
        apply_lora(model, r=cfg.peft.r, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                   target_modules=cfg.peft.target_modules, exclude_modules=cfg.peft.exclude_modules, seed=cfg.seed)

    # Data.
    seq_len, data_cfg = cfg.data.seq_len, cfg.data
    for split in ("train", "validation"):
        data_cfg[split].path = embedded.resolve(data_cfg[split].path)
    train_set = build_dataset(data_cfg.train, tokenizer, seq_len, data_cfg.truncation)
    val_set = build_dataset(data_cfg.validation, tokenizer, seq_len, data_cfg.truncation)
    pad_id = resolve_pad_id(tokenizer, data_cfg.pad_token_id, data_cfg.pad_with_eos)
    accum, process_batch = batch_geometry(cfg, mesh)
    loader = make_loader(train_set, batch_size=process_batch, seq_len=seq_len, pad_id=pad_id, seed=cfg.seed,
                         shard_index=jax.process_index(), shard_count=jax.process_count(),
                         packing=data_cfg.packing)
    steps_per_epoch = max(len(train_set) // cfg.train.global_batch_size, 1)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.num_epochs

    # Checkpoints: find the one to resume (the run's latest, else checkpoint.restore_from); it must fit the model.
    checkpoints = TrainCheckpoints(cfg, model, total_steps)

    # Optimizer, state, jitted steps.
    optimizer, schedule = build_optimizer(cfg.optim, total_steps)
    graphdef, trainable, frozen = split_model(model, lora)
    state, state_shardings = init_state(trainable, optimizer, cfg.seed, tree_shardings(model, trainable, mesh, rules))
    frozen_shardings = tree_shardings(model, frozen, mesh, rules)
    frozen = jax.device_put(frozen, frozen_shardings)
    step_kw = dict(loss_impl=cfg.loss.impl, chunk_size=cfg.loss.chunk_size, right_padded=not data_cfg.packing)
    train_step, eval_step, batch_3d, batch_2d = compile_steps(
        make_train_step(graphdef, optimizer, schedule, grad_shardings=state_shardings["params"], **step_kw),
        make_eval_step(graphdef, **step_kw), state_shardings, frozen_shardings, mesh, rules)
    del model, trainable
    state = checkpoints.restore(state, state_shardings, loader)  # train state and data position, onto this mesh

    logger = MetricsLogger(run_dir, enabled=primary, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                           total_steps=total_steps, run_config=cfg.to_dict())
    val_batches = loop.validation_batches(val_set, cfg.train.val_max_samples, cfg.train.micro_batch_size * mesh.shape[
        "data"] * mesh.shape["fsdp"], seq_len, pad_id)

    def validate(step: int) -> float:
        loss = loop.validation_loss(eval_step, state["params"], frozen, val_batches, batch_2d)
        logger.log(step, {"loss": loss}, "val")
        return loss

    def generations(title: str):
        """Every process takes part (the parameters are sharded over all of them); only process 0 prints."""
        if cfg.train.sample_prompts:
            model_now = nnx.merge(graphdef, state["params"], frozen)
            with contextlib.nullcontext() if primary else contextlib.redirect_stdout(io.StringIO()):
                loop.print_generations(title, model_now, tokenizer, cfg.train.sample_prompts,
                                       cfg.train.sample_max_new_tokens)

    # Train.
    start_step = int(state["step"])
    first_val = validate(start_step)
    generations("before fine-tuning")

    def checked(metrics, step: int) -> dict[str, float]:
        """Host values of a step's metrics; a non-finite step left the state as it was: keep that on disk, stop."""
        try:
            return loop.check_metrics(metrics, step)
        except TrainingError:
            checkpoints.save(int(state["step"]), state, loader, final=True)
            checkpoints.close()
            logger.close()  # ends the progress bar's line, so the error starts a line of its own
            raise

    pending, tokens_since = None, 0
    for step in range(start_step, total_steps):
        batch = loop.global_batch(next(loader), accum, batch_3d)
        if step == start_step:  # compile ahead of time once, so the compile time is logged apart from training
            t_compile = time.perf_counter()
            train_step = train_step.lower(state, frozen, batch).compile()
            log.info("compiled the train step in %.1f s", time.perf_counter() - t_compile)
            t_last = time.perf_counter()
        state, metrics = train_step(state, frozen, batch)
        if pending is not None:  # read step k-1's metrics while step k runs: no host sync in the loop
            done = checked(pending, step)
            tokens_since += done["tokens"]
            if step % cfg.train.log_every == 0:
                now = time.perf_counter()
                done["tokens_per_sec"] = tokens_since / (now - t_last)
                t_last, tokens_since = now, 0
                logger.log(step, done, "train")
            logger.progress(step, done)
        pending = metrics
        val_loss = None
        if cfg.train.val_every and (step + 1) % cfg.train.val_every == 0 and step + 1 < total_steps:
            val_loss = validate(step + 1)
        checkpoints.save(step + 1, state, loader, val_loss)  # asynchronous, every checkpoint.every_steps
    if pending is not None:
        done = checked(pending, total_steps)
        logger.log(total_steps, done, "train")
        logger.progress(total_steps, done)
    final_val = validate(total_steps)
    checkpoints.save(total_steps, state, loader, final_val, final=True)
    generations("after fine-tuning")
    if primary:
        print(f"validation loss: {first_val:.4f} before -> {final_val:.4f} after {total_steps} steps", flush=True)
    logger.plot_losses()
    logger.close()
    checkpoints.close()
    trained = nnx.merge(graphdef, state["params"], frozen)
    if export_to is not None:
        export_model(trained, export_to, base_model_name_or_path=model_path, merge_lora=cfg.export.merge_lora,
                     overwrite=cfg.export.overwrite)
    scores = {}
    if cfg.evaluation.task != "none":
        from automodel_jax.evaluation import evaluate
        rows = load_rows(cfg.evaluation.data, cfg.evaluation.split, cfg.evaluation.limit)
        scores = evaluate(trained, tokenizer, cfg.evaluation.task, rows, cfg.evaluation.limit,
                          cfg.evaluation.batch_size)
        if primary:
            print(f"evaluation {cfg.evaluation.task}: {scores}", flush=True)
            with open(run_dir / "evaluation.json", "w") as f:
                json.dump(scores, f, indent=2)
    return dict(val_loss_before=first_val, val_loss_after=final_val, steps=total_steps, model=trained,
                evaluation=scores)


def main(argv: list[str] | None = None) -> int:
    # force: grain/orbax import absl, which installs a root handler at WARNING before we get here.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return exit_code(lambda: run(parse_config(sys.argv[1:] if argv is None else argv)),
                     BAD_INPUT + (TrainingError, DistributedInitError))


if __name__ == "__main__":
    sys.exit(main())
