"""The train loop both recipes share: the `Run` that a recipe's setup builds, validation, and the loop itself.

A recipe's `setup` builds the model, data, optimizer and jitted steps into a `Run`; `train_loop` then runs the jitted
step on global batches with metrics read one step behind (no host sync in the loop), validation and asynchronous
checkpoints on their cadence, throughput at each log step, and an optional profiler trace. `bench/` drives the same
functions.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx
from ml_collections import config_dict

from automodel_jax.checkpoint.export import export_defaults, export_dir
from automodel_jax.checkpoint.hf import load_pretrained
from automodel_jax.checkpoint.orbax_io import (CHECKPOINT_DIR, TrainCheckpoints, check_checkpoint_config,
                                              checkpoint_defaults)
from automodel_jax.config import ConfigError, check_writable_dir, config_changes, save_config
from automodel_jax.launcher.distributed import describe_topology, initialize_distributed
from automodel_jax.models.layers import amax_histories
from automodel_jax.parallel.sharding import mesh_from_config, tree_shardings
from automodel_jax.peft.lora import split_model
from automodel_jax.training.loop import (TrainingError, check_metrics, global_batch, nonfinite_causes,
                                         validation_loss)
from automodel_jax.training.metrics import (MetricsLogger, Throughput, check_wandb_config, peak_tflops,
                                            train_flops_per_token, wandb_defaults)
from automodel_jax.training.interrupt import SignalStop
from automodel_jax.training.optim import build_optimizer, check_optim_config, optim_defaults
from automodel_jax.training.profile import StepProfiler, profile_defaults
from automodel_jax.training.step import compile_steps, init_state, make_eval_step, make_train_step

log = logging.getLogger("automodel_jax.finetune")

COMPLETE_FILE = "complete.json"  # written into the run dir when a run has finished: its steps and config


def trainer_defaults(run_dir: str) -> ml_collections.ConfigDict:
    """The config sections every recipe shares (batch geometry and cadence, optimizer, loss, mesh, logging,
    checkpoints, export, distributed start-up, profiling); a recipe adds its model, peft and data sections."""
    cfg = ml_collections.ConfigDict()
    cfg.run_dir = run_dir
    cfg.seed = 0
    cfg.train = dict(global_batch_size=32, micro_batch_size=8, max_steps=config_dict.placeholder(int),
                     num_epochs=1, log_every=10, val_every=100, val_max_samples=config_dict.placeholder(int),
                     sample_prompts=(), sample_max_new_tokens=32,
                     # Stop after the current step, save a checkpoint and exit 128+N on this signal (and on SIGINT).
                     preemption_signal="SIGTERM",
                     # JAX's persistent compilation cache: a rerun or resume loads its compiled steps from here
                     # (None: xla/ in the project's cache directory; see config/cache.py).
                     compilation_cache=True, compilation_cache_dir=config_dict.placeholder(str))
    cfg.optim = optim_defaults()
    cfg.loss = dict(impl="chunked", chunk_size=config_dict.placeholder(int))  # None: per-impl default
    cfg.mesh = dict(data=1, fsdp=-1, tensor=1, context=1, zero3_over_data=False)
    # peak_tflops: one device's peak bf16 TFLOP/s for MFU (None: looked up from the device kind; no MFU if unknown)
    cfg.logging = dict(tensorboard=True, wandb=wandb_defaults(), peak_tflops=config_dict.placeholder(float))
    cfg.checkpoint = checkpoint_defaults()
    cfg.export = export_defaults()
    cfg.distributed = dict(timeout_s=300)
    cfg.profile = profile_defaults()
    return cfg


@dataclasses.dataclass
class Run:
    """Everything `setup` builds: the jitted steps, their state on the mesh, the data, and the run's services."""
    cfg: Any
    mesh: Any
    primary: bool
    run_dir: Path
    export_to: Path | None
    model_path: str
    tokenizer: Any
    graphdef: Any
    state: dict
    frozen: dict
    train_step: Any
    eval_step: Any
    batch_3d: dict
    batch_2d: dict
    loader: Any
    val_batches: list
    accum: int
    total_steps: int
    checkpoints: TrainCheckpoints
    logger: MetricsLogger
    throughput: Throughput
    prepare: Callable[[dict], dict] | None = None  # host transform of each loader batch (e.g. a VLM's host_batch)

    def model(self) -> nnx.Module:
        """The model with the state's current parameters (and amax histories, with delayed FP8 scaling)."""
        fp8 = self.state.get("fp8")
        return nnx.merge(self.graphdef, self.state["params"], self.frozen, *([] if fp8 is None else [fp8]))

    def close(self) -> None:
        """End the progress bar and metric writers, wait for the checkpoint save in flight and stop the checkpoint
        managers' background work; safe to call twice (recipes close the run on every way out)."""
        try:
            self.logger.close()
        finally:
            self.checkpoints.close()


@dataclasses.dataclass(frozen=True)
class Started:
    """A run's first phase done: export directory checked, processes joined, mesh built; `config`: a copy of the
    config as given (before a recipe resolves its paths), which `build_run` saves; `run_files`: name -> text of
    other files saved with it (the plan)."""
    export_to: Path | None
    primary: bool
    run_dir: Path
    mesh: Any
    rules: dict
    config: Any
    run_files: dict = dataclasses.field(default_factory=dict)


def check_training_config(cfg) -> None:
    """The trainer's settings that need no devices, model or data, checked before anything is built (a recipe's
    `check_run_config`; `build_run` checks them again where they are used): the optimizer and its schedule (against
    train.max_steps when it is set; a run by epochs learns its length from the data), the checkpoint counts and the
    W&B mode. ConfigError naming the bad setting."""
    check_optim_config(cfg.optim, cfg.train.max_steps or None)
    check_checkpoint_config(cfg.checkpoint)
    check_wandb_config(cfg.logging.wandb)


def start(cfg) -> Started:
    """Check the run and export directories (writable; nothing is trained into an export that would fail), join
    the other processes, build the mesh and print the topology. Nothing is written yet: the config is saved by
    `build_run`, once the model, data, checkpoints and optimizer are known to fit it."""
    check_writable_dir(cfg.run_dir, "run_dir")
    export_to = export_dir(cfg)
    if export_to is not None:
        check_writable_dir(export_to, "export.dir" if cfg.export.dir else "run_dir")
    initialize_distributed(cfg.distributed.timeout_s)
    primary = jax.process_index() == 0
    run_dir = Path(cfg.run_dir)
    if cfg.get("plan") is not None and cfg.plan.mode == "auto":
        # The plan chooses the mesh (`plan_run.prepare_run`); until then every device on fsdp, whatever the config's.
        mesh, rules = mesh_from_config({"fsdp": -1, "zero3_over_data": cfg.mesh.get("zero3_over_data", False)})
    else:
        mesh, rules = mesh_from_config(cfg.mesh)
        describe_topology(mesh)
    return Started(export_to, primary, run_dir, mesh, rules, copy.deepcopy(cfg))


def load_model(cfg, model_path: str, started: Started):
    """model.path's HF checkpoint streamed onto the mesh, in model.dtype over model.param_dtype, with the config's
    activation checkpointing and attention implementation (and scanned layers where the recipe has
    model.scan_layers and sets it)."""
    overrides = dict(remat=cfg.model.remat, attention_impl=cfg.model.attention)
    if cfg.model.get("scan_layers"):
        overrides["scan_layers"] = True
    return load_pretrained(model_path, dtype=jax.numpy.dtype(cfg.model.dtype),
                           param_dtype=jax.numpy.dtype(cfg.model.param_dtype), mesh=started.mesh, rules=started.rules,
                           model_overrides=overrides)


def batch_geometry(cfg, mesh) -> tuple[int, int]:
    """(gradient-accumulation steps, per-process batch) from global and micro batch sizes (NeMo Automodel's way).
    Raises ConfigError when the sizes do not divide."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if global_batch % (micro * dp):
        raise ConfigError(f"train.global_batch_size {global_batch} must be a multiple of train.micro_batch_size "
                          f"{micro} x data-parallel size {dp}")
    if global_batch % jax.process_count():
        raise ConfigError(f"train.global_batch_size {global_batch} must be divisible by the process count "
                          f"{jax.process_count()}")
    return global_batch // (micro * dp), global_batch // jax.process_count()


def build_run(cfg, started: Started, *, model, lora: bool, model_path: str, tokenizer, loader, val_batches: list,
              accum: int, total_steps: int, max_segments: int | None, frozen: tuple[str, ...] = (),
              batch_ranks: dict[str, int] | None = None, prepare: Callable[[dict], dict] | None = None) -> Run:
    """Optimizer -> checkpoints (finding the one to resume, checked against the model and its config) -> the resolved
    config saved into the run dir (process 0; the first write into it) -> train state and jitted steps on their
    declared shardings -> restored state and data position -> metrics logger: the `Run` to train.
    `frozen`: module patterns full SFT keeps frozen; `batch_ranks`: the batch's keys and per-row ranks;
    `max_segments`: the batches' row layout (1 = right-padded, n = packed; see `AttentionInputs`)."""
    mesh, rules = started.mesh, started.rules
    optimizer, schedule = build_optimizer(cfg.optim, total_steps)
    checkpoints = TrainCheckpoints(cfg, model, total_steps, model_path)
    resuming = checkpoints.source is not None  # (restore() lets go of the source)
    try:
        if started.primary:
            record_config(started, resuming=resuming)
        graphdef, trainable, frozen_params = split_model(model, lora, frozen)
        state, state_shardings = init_state(trainable, optimizer, cfg.seed,
                                            tree_shardings(model, trainable, mesh, rules), amax_histories(model))
        frozen_shardings = tree_shardings(model, frozen_params, mesh, rules)
        frozen_params = jax.device_put(frozen_params, frozen_shardings)
        step_kw = dict(loss_impl=cfg.loss.impl, chunk_size=cfg.loss.chunk_size, max_segments=max_segments)
        train_step, eval_step, batch_3d, batch_2d = compile_steps(
            make_train_step(graphdef, optimizer, schedule, grad_shardings=state_shardings["params"], **step_kw),
            make_eval_step(graphdef, **step_kw), state_shardings, frozen_shardings, mesh, rules, batch_ranks)
        state = checkpoints.restore(state, state_shardings, loader)  # train state and data position, onto this mesh
        logger = MetricsLogger(started.run_dir, enabled=started.primary, tensorboard=cfg.logging.tensorboard,
                               wandb=cfg.logging.wandb, total_steps=total_steps, run_config=cfg.to_dict(),
                               resumed_step=int(state["step"]) if resuming else None)
        throughput = Throughput(train_flops_per_token(model, trainable, frozen_params, cfg.data.seq_len),
                                peak_tflops(jax.devices()[0].device_kind, cfg.logging.peak_tflops), jax.devices())
        return Run(cfg, mesh, started.primary, started.run_dir, started.export_to, model_path, tokenizer, graphdef,
                   state, frozen_params, train_step, eval_step, batch_3d, batch_2d, loader, val_batches, accum,
                   total_steps, checkpoints, logger, throughput, prepare)
    except BaseException:
        checkpoints.close()  # its managers' background work ends before the error is reported
        raise


def record_config(started: Started, resuming: bool) -> None:
    """Save the config into the run dir, which now holds a run in progress (not a complete one). A run dir with
    checkpoints that this run does not resume (say checkpoint.enabled=false) gets a one-line note naming what
    changed; a resumed run's changes are named by its checkpoints (`TrainCheckpoints`)."""
    run_dir, previous = started.run_dir, started.run_dir / "config.json"
    if not resuming and previous.is_file() and (run_dir / CHECKPOINT_DIR).is_dir():
        changes = config_changes(json.loads(previous.read_text()), started.config.to_dict())
        if changes:
            print(f"{run_dir} holds checkpoints that this run does not resume; its config.json is replaced by this "
                  f"run's: {'; '.join(changes)}", flush=True)
    save_config(started.config, run_dir)
    for name, text in started.run_files.items():
        (run_dir / name).write_text(text)
    (run_dir / COMPLETE_FILE).unlink(missing_ok=True)


def mark_complete(given: dict, steps: int) -> None:
    """Record in the run dir that a run of the config `given` (its `to_dict()` before the recipe ran) finished all
    `steps` (final checkpoint and export written), so that the same command run again reports it complete
    (`completed_run`) instead of failing on its export directory. Process 0 writes."""
    if jax.process_index() == 0:
        record = dict(steps=steps, config=given)
        (Path(given["run_dir"]) / COMPLETE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def completed_run(cfg) -> str | None:
    """A one-line note when cfg.run_dir already finished with this very config (nothing to do), else None (a new
    run, a run to resume, or a finished run given another config, e.g. more steps)."""
    path = Path(cfg.run_dir) / COMPLETE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if config_changes(record["config"], cfg.to_dict()):
        return None
    export = cfg.export.dir or Path(cfg.run_dir) / "export"
    exported = "not exported (export.when=never)" if cfg.export.when == "never" else f"exported to {export}"
    return (f"run {cfg.run_dir} is complete: {record['steps']} steps, {exported}; nothing to do (another run_dir "
            f"starts a new run; a higher train.max_steps with export.overwrite=true continues this one)")


class LabelledLines(io.TextIOBase):
    """A text stream that writes every line to `out` with `label` in front (what a nested run prints)."""

    def __init__(self, out, label: str):
        self.out, self.label, self.at_line_start = out, label, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            self.out.write((self.label if self.at_line_start else "") + piece)
            self.at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def pretrain_base(run: Callable[[Any], dict], cfg, label: str):
    """The model that `run(cfg)` (a recipe's run) trains when it builds an embedded base model, with every line that
    run prints labelled `[label]`, so that its validation summary is not taken for the user's run. `cfg` should
    checkpoint into its run_dir: an interrupted build then resumes where it stopped."""
    with contextlib.redirect_stdout(LabelledLines(sys.stdout, f"[{label}] ")):
        return run(cfg)["model"]


def validate(run: Run, step: int) -> float:
    """Validation loss of the current parameters, logged at `step`."""
    loss = validation_loss(run.eval_step, run.state["params"], run.frozen, run.val_batches, run.batch_2d,
                           run.state.get("fp8"))
    run.logger.log(step, {"loss": loss}, "val")
    return loss


def start_label(step: int) -> str:
    """What printed results call the state training starts from: "before" (fine-tuning), or "when resumed from step
    N" for a run that continues a checkpoint."""
    return "before" if step == 0 else f"when resumed from step {step}"


def train_loop(run: Run, until_step: int | None = None) -> None:
    """Train from the state's step to `until_step` (default: the run's total): the jitted step on each global batch,
    metrics read one step behind (no host sync in the loop) and at once before a validation or checkpoint (which read
    the state anyway), validation and checkpoints on their cadence, throughput at log steps.

    A non-finite step stops training with TrainingError after saving the last good state (steps after the bad one
    leave the state as it was; see training.step) with its own step count and the data position before the bad
    step's batch, so the checkpoint's step, parameters and data position agree. On SIGINT or
    train.preemption_signal: finish the step in flight, stop after the same step on every process, save its
    checkpoint and raise `Interrupted`.
    """
    with SignalStop(run.cfg.train.preemption_signal, at_step_end=True) as stop:
        _train_steps(run, until_step, stop)


def _train_steps(run: Run, until_step: int | None, stop: SignalStop) -> None:
    cfg, total_steps = run.cfg, run.total_steps
    until_step = total_steps if until_step is None else until_step
    start_step = int(run.state["step"])
    profiler = StepProfiler(cfg.profile, run.run_dir, enabled=run.primary)
    causes = nonfinite_causes(cfg)
    positions = {}  # data position before each step whose metrics are not read yet
    t_last = time.perf_counter()

    def record(metrics, step: int, force_log: bool = False) -> None:
        """Reads step `step`'s metrics (steps counted from 1): logged at log steps (and the last one), shown on the
        progress bar."""
        nonlocal t_last
        try:
            done = check_metrics(metrics, step, causes)
        except TrainingError:
            good = int(run.state["step"])
            run.loader.set_state(positions[good])
            run.checkpoints.save(good, run.state, run.loader, final=True)
            run.checkpoints.close()
            run.logger.close()  # ends the progress bar's line, so the error starts a line of its own
            raise
        positions.pop(step - 1, None)
        run.throughput.add(done)
        if force_log or step % cfg.train.log_every == 0 or step == until_step:
            now = time.perf_counter()
            done.update(run.throughput.rates(now - t_last))
            t_last = now
            run.logger.log(step, done, "train")
        run.logger.progress(step, done)

    pending, stopped_after = None, None
    for step in range(start_step, until_step):
        positions[step] = run.loader.get_state()
        local = next(run.loader)
        batch = global_batch(local if run.prepare is None else run.prepare(local), run.accum, run.batch_3d)
        if not isinstance(run.train_step, jax.stages.Compiled):  # compile ahead of time once, logged apart
            t_compile = time.perf_counter()
            run.train_step = run.train_step.lower(run.state, run.frozen, batch).compile()
            log.info("compiled the train step in %.1f s", time.perf_counter() - t_compile)
            t_last = time.perf_counter()
        profiler.before(step, run.state)  # a trace of profile.num_steps steps, if enabled
        run.state, metrics = run.train_step(run.state, run.frozen, batch)
        if pending is not None:  # read step k-1's metrics while step k runs: no host sync in the loop
            record(pending, step)
        pending = metrics
        validating = cfg.train.val_every and (step + 1) % cfg.train.val_every == 0 and step + 1 < total_steps
        if validating or run.checkpoints.due(step + 1):  # the state validated or saved must be a finite one
            record(pending, step + 1)
            pending = None
        val_loss = None
        if validating:
            t_validate = time.perf_counter()
            val_loss = validate(run, step + 1)
            t_last += time.perf_counter() - t_validate  # throughput counts training time only
        run.checkpoints.save(step + 1, run.state, run.loader, val_loss)  # asynchronous, every checkpoint.every_steps
        if stop.agreed(step + 1, cfg.distributed.timeout_s):  # a signal: every process stops after this step
            stopped_after = step + 1
            break
    profiler.close(run.state)
    last = until_step if stopped_after is None else stopped_after
    if pending is not None:
        record(pending, last, force_log=True)
    run.logger.end_progress()
    if stopped_after is not None:
        run.checkpoints.save(stopped_after, run.state, run.loader, final=True)
        run.checkpoints.wait()
        saved = str(run.checkpoints.directory / str(stopped_after)) if run.checkpoints.manager is not None else None
        run.logger.close()  # ends the progress bar's line, so the message starts a line of its own
        raise stop.interrupted(stopped_after, saved)
