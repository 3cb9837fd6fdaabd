"""Orbax checkpoints of a run: asynchronous saves, keep the last K (and the best by validation loss), exact resume.

A checkpoint is a step directory RUN_DIR/checkpoints/STEP holding the items
  params  the trainable pytree (the LoRA adapters, or every parameter for full fine-tuning),
  train   the rest of the train state: step, optimizer state, rng (and fp8, the amax histories of delayed FP8
          scaling, in runs that use it),
  data    the data loader's position (JSON),
  config  the run's resolved config (JSON),
  meta    what the parameters belong to (JSON): the base model's HF config and tensor dtypes, its path, the LoRA
          settings, the chat template training used in place of the tokenizer's (None: the tokenizer's; exports
          write it into their tokenizer files); with delayed FP8 scaling, `fp8_delayed`: the history length and the
          FP8 layers. Checked on restore, so a checkpoint of another model, LoRA shape or FP8 scaling state fails with
          a clear message.
The frozen base weights are never saved (they come from the HF checkpoint). Orbax writes STEP.orbax-checkpoint-tmp and
renames it when complete, so an interrupted save is never taken for a step (and is deleted on the next start).
Parameter checkpoints (converters/hf_to_orbax.py) hold only params and meta.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import config_dict
from orbax.checkpoint.checkpoint_managers import preservation_policy

from automodel_jax.checkpoint.hf import commit_output_dir, load_pretrained, prepare_output_dir
from automodel_jax.checkpoint.safetensors_io import CheckpointError
from automodel_jax.config import ConfigError, config_changes
from automodel_jax.data.builders import training_chat_template
from automodel_jax.models.base import HFSource, build_model
from automodel_jax.models.layers import linear_modules
from automodel_jax.parallel.sharding import tree_shardings
from automodel_jax.peft.lora import adapters, apply_lora, lora_settings, split_model

log = logging.getLogger("automodel_jax.checkpoint")

CHECKPOINT_DIR = "checkpoints"
TREE_ITEMS, JSON_ITEMS = ("params", "train"), ("data", "config", "meta")
# Train-state keys outside the `train` item: the parameters (their own item) and "ok" (the step's non-finite latch;
# a restored state starts ok).
NOT_IN_TRAIN_ITEM = ("params", "ok")
FORMAT_VERSION = 1
# HF config keys that name or describe a checkpoint file rather than the model's shape and maths.
NON_IDENTITY_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                               "architectures"})


def checkpoint_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        enabled=True,
        every_steps=100,  # save every N steps (0 = only at the end); saves are asynchronous
        keep=2,  # keep the last K checkpoints ...
        keep_best=0,  # ... plus the best N by validation loss (checkpoints saved at validation steps)
        async_save=True,
        restore_from=config_dict.placeholder(str),  # a checkpoint to start a fresh run_dir from
    ))


def _manager(directory: Path, *, keep: int | None = None, keep_best: int = 0, async_save: bool = False,
             create: bool = True) -> ocp.CheckpointManager:
    policies = [preservation_policy.LatestN(keep)]
    if keep_best:
        policies.append(preservation_policy.BestN(get_metric_fn=lambda metrics: metrics["val_loss"], reverse=True,
                                                  n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=create, enable_async_checkpointing=async_save, cleanup_tmp_directories=create,
        preservation_policy=preservation_policy.AnyPreservationPolicy(policies))
    handlers = {name: ocp.StandardCheckpointHandler() for name in TREE_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
    return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


def _close(manager: ocp.CheckpointManager) -> None:
    """Close `manager` after its start-up clean-up of interrupted saves (a background thread that `close` does not
    wait for: left running at exit it prints a traceback)."""
    await_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
        await_cleanup()
    manager.close()


def _steps(root: Path) -> list[int]:
    """The complete steps under `root` (Orbax's view: interrupted saves are not steps)."""
    if not root.is_dir():
        return []
    manager = _manager(root, create=False)
    try:
        return list(manager.all_steps())
    finally:
        manager.close()


def locate(path) -> tuple[Path, int]:
    """(checkpoints root, step) for a step directory, RUN_DIR/STEP, a checkpoints directory or a run directory (its
    latest complete step)."""
    given = Path(path).expanduser().absolute()
    if not given.exists() and given.name.isdigit() and (given.parent / CHECKPOINT_DIR / given.name).is_dir():
        given = given.parent / CHECKPOINT_DIR / given.name
    if not given.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a run directory, its {CHECKPOINT_DIR}/ "
                                f"directory or a step directory such as RUN_DIR/{CHECKPOINT_DIR}/100")
    if given.name.isdigit():
        if int(given.name) not in _steps(given.parent):
            raise CheckpointError(f"{given} is not a complete checkpoint (an interrupted save?); pass a complete "
                                  f"step directory or the run directory to take its latest")
        return given.parent, int(given.name)
    for root in (given / CHECKPOINT_DIR, given):
        steps = _steps(root)
        if steps:
            return root, max(steps)
    raise FileNotFoundError(f"{path} holds no complete checkpoint (no step directories under it or under "
                            f"{CHECKPOINT_DIR}/); pass the run directory of a run that saved checkpoints")


def model_meta(model: nnx.Module, model_path: str, kind: str = "train") -> dict:
    """The meta item: what the checkpoint's parameters belong to and how they were adapted (param_dtype: the dtype
    of the saved parameters; kind: "train" for a run's checkpoint, "params" for parameters only)."""
    source = model.hf_source
    peft = {"method": "lora", **lora_settings(model)} if adapters(model) else {"method": "none"}
    param_dtype = jnp.dtype(jax.tree.leaves(split_model(model, bool(adapters(model)))[1])[0].dtype).name
    meta = dict(format=FORMAT_VERSION, kind=kind, model_path=model_path, hf_config=json.loads(source.config_json),
                hf_dtypes=dict(source.dtypes), param_dtype=param_dtype, peft=peft)
    if scan_layers(model):  # its parameters are stacked [num_layers, ...] (absent: unrolled, as before the option)
        meta["scan_layers"] = True
    return meta


def scan_layers(model: nnx.Module) -> bool:
    """Whether the model's decoder layers are scanned (model.scan_layers: parameters stacked per layer)."""
    return bool(getattr(getattr(model, "config", None), "scan_layers", False))


def _identity_differences(saved: dict, current: dict):
    """(key, saved value, current value) where two HF configs describe different models."""
    keys = (set(saved) | set(current)) - NON_IDENTITY_KEYS
    return [(key, saved.get(key), current.get(key)) for key in sorted(keys) if saved.get(key) != current.get(key)]


def check_compatible(saved: dict, current: dict, where) -> None:
    """CheckpointError naming the first difference between a checkpoint's meta and the model it is restored into."""
    if saved.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {where} has format {saved.get('format')}, this version reads "
                              f"{FORMAT_VERSION}; export it with the version that wrote it")
    for key, was, now in _identity_differences(saved["hf_config"], current["hf_config"])[:1]:
        raise CheckpointError(f"checkpoint {where} was trained on a model with {key}={was!r}, but the model at "
                              f"{current['model_path']} has {key}={now!r}; use the checkpoint's base model "
                              f"({saved['model_path']}) or a fresh run_dir")
    if saved.get("scan_layers", False) != current.get("scan_layers", False):
        was = saved.get("scan_layers", False)
        raise CheckpointError(f"checkpoint {where} was trained with model.scan_layers={str(was).lower()} but the "
                              f"config says model.scan_layers={str(not was).lower()} (the parameters are laid out "
                              f"differently); set model.scan_layers={str(was).lower()} or use a fresh run_dir")
    was, now = saved["peft"], current["peft"]
    if was["method"] != now["method"]:
        raise CheckpointError(f"checkpoint {where} was trained with peft.method={was['method']!r} but the config "
                              f"says peft.method={now['method']!r}")
    for key, name in (("r", "r"), ("alpha", "alpha"), ("targets", "target_modules")):
        if key in was and was[key] != now[key]:
            shown = (lambda v: f"{len(v)} modules ({', '.join(v[:2])}, ...)") if key == "targets" else repr
            raise CheckpointError(f"checkpoint {where} was trained with LoRA {key}={shown(was[key])} but the config "
                                  f"says {key}={shown(now[key])} (peft.{name}); use the checkpoint's settings or a "
                                  f"fresh run_dir")


def delayed_fp8_meta(model: nnx.Module) -> dict | None:
    """{"amax_history_len", "layers"} of a model with delayed FP8 scaling (what its train state's fp8 tree holds),
    None for a model without (no FP8, or tensorwise)."""
    lengths = {name: layer.amax_history[...].shape[-1] for name, layer in linear_modules(model).items()
               if layer.amax_history is not None}
    if not lengths:
        return None
    return dict(amax_history_len=max(lengths.values()), layers=sorted(lengths))


def check_fp8_state(saved: dict | None, current: dict | None, where) -> None:
    """ConfigError naming the model.fp8 key that makes a checkpoint's delayed FP8 scaling state (`delayed_fp8_meta`
    of its meta) differ from this run's, before Orbax would fail on the train state's shape."""
    if saved == current:
        return
    fresh = "or use a fresh run_dir"
    if saved is None:
        raise ConfigError(f"checkpoint {where} has no FP8 amax histories (it was not trained with "
                          f"model.fp8.recipe=delayed), but this run uses delayed scaling; resume it with the "
                          f"model.fp8.recipe / model.fp8.enabled it was trained with {fresh}")
    if current is None:
        raise ConfigError(f"checkpoint {where} was trained with model.fp8.recipe=delayed (its state holds FP8 amax "
                          f"histories), but this run has no delayed scaling; resume it with model.fp8.enabled=true "
                          f"model.fp8.recipe=delayed {fresh}")
    if saved["amax_history_len"] != current["amax_history_len"]:
        raise ConfigError(f"checkpoint {where} keeps {saved['amax_history_len']} steps of FP8 amax history but "
                          f"model.fp8.amax_history_len is {current['amax_history_len']}; resume it with "
                          f"model.fp8.amax_history_len={saved['amax_history_len']} {fresh}")
    layer = sorted(set(saved["layers"]) ^ set(current["layers"]))[0]
    which = "in FP8 there but not in this run" if layer in saved["layers"] else "in FP8 in this run but not there"
    raise ConfigError(f"checkpoint {where} has FP8 amax histories for {len(saved['layers'])} layers, this run for "
                      f"{len(current['layers'])} ({layer} is {which}); resume it with the model.fp8.filter_modules "
                      f"it was trained with {fresh}")


def _read_json(manager: ocp.CheckpointManager, step: int, names) -> dict:
    return dict(manager.restore(step, args=ocp.args.Composite(**{n: ocp.args.JsonRestore() for n in names})))


def _abstract(tree, shardings):
    """Restore targets: shape, dtype and the sharding each array must land on (any mesh, any device count)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_checkpoint_config(ck: ml_collections.ConfigDict) -> None:
    """ConfigError naming a `checkpoint` count out of range (checked again when the run's checkpoints are set up)."""
    for key, low in (("every_steps", 0), ("keep", 1), ("keep_best", 0)):
        if ck[key] < low:
            raise ConfigError(f"checkpoint.{key} must be >= {low}, got {ck[key]}")


class TrainCheckpoints:
    """The run's checkpoints: finds the one to resume when built (and checks that it fits the model, before anything
    is compiled), restores it into the train state and the loader, saves every N steps and at the end.

    Resumes the run_dir's latest complete checkpoint, else checkpoint.restore_from; restore_from only seeds a run_dir
    without checkpoints of its own, so rerunning the same command continues where the run stopped. Resuming with a
    config that differs from the checkpoint's (say a new learning rate) is allowed, as in NeMo Automodel, and said in
    one line naming every changed key. `model_path` (the base model's local directory, default cfg.model.path) is
    recorded so that exports find the base again.
    """

    def __init__(self, cfg, model: nnx.Module, total_steps: int, model_path: str | None = None):
        ck = cfg.checkpoint
        check_checkpoint_config(ck)
        self.every, self.total_steps, self.config = ck.every_steps, total_steps, cfg.to_dict()
        self.directory = Path(cfg.run_dir).absolute() / CHECKPOINT_DIR
        self.meta = {**model_meta(model, cfg.model.path if model_path is None else model_path),
                     "chat_template": training_chat_template(cfg.data)}
        fp8 = delayed_fp8_meta(model)
        if fp8 is not None:  # only runs with delayed scaling: other checkpoints stay as they were
            self.meta["fp8_delayed"] = fp8
        self.manager = _manager(self.directory, keep=ck.keep, keep_best=ck.keep_best,
                                async_save=ck.async_save) if ck.enabled else None
        self._pending = None
        self.source = None  # (manager, step) to restore
        try:  # the managers run background work from the start: a refused checkpoint closes them before the error
            self._find_source(ck.restore_from, total_steps)
        except BaseException:
            self.close()
            raise

    def _find_source(self, restore_from: str | None, total_steps: int) -> None:
        """The checkpoint to resume (this run_dir's latest, else `restore_from`), checked against the model."""
        own = self.manager.latest_step() if self.manager else None
        if own is not None:
            self.source = (self.manager, own)
            if restore_from and jax.process_index() == 0:
                print(f"checkpoint.restore_from is not used: {self.directory} has checkpoints of its own (the run "
                      f"resumes its step {own})", flush=True)
        elif restore_from:
            root, step = locate(restore_from)
            self.source = (_manager(root, create=False), step)
        if self.source is not None:
            manager, step = self.source
            meta = _read_json(manager, step, ["meta"])["meta"]
            where = Path(manager.directory) / str(step)
            check_compatible(meta, self.meta, where)
            check_fp8_state(meta.get("fp8_delayed"), self.meta.get("fp8_delayed"), where)
            if meta.get("kind") != "train":
                raise CheckpointError(f"checkpoint {where} holds parameters only (no optimizer or data state); "
                                      f"it cannot resume training")
            changes = config_changes(_read_json(manager, step, ["config"])["config"], self.config,
                                     ignore=("run_dir", "checkpoint.restore_from"))
            if changes and jax.process_index() == 0:
                print(f"resuming {where} with a config that differs from the one it was saved with: "
                      f"{'; '.join(changes)} (config.json records the new one; the checkpoint keeps its own)",
                      flush=True)
            if step > total_steps:
                raise ConfigError(f"checkpoint {where} is past the {total_steps} steps this config trains for; "
                                  f"raise train.max_steps or use a fresh run_dir")

    def restore(self, state: dict, shardings: dict, loader) -> dict:
        """The state (and loader position) of the checkpoint found at construction, else `state` unchanged."""
        if self.source is None:
            return state
        manager, step = self.source
        rest = lambda tree: {k: v for k, v in tree.items() if k not in NOT_IN_TRAIN_ITEM}  # noqa: E731
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(state["params"], shardings["params"])),
            train=ocp.args.StandardRestore(_abstract(rest(state), rest(shardings))),
            data=ocp.args.JsonRestore()))
        loader.set_state(restored["data"])
        if manager is not self.manager:
            manager.close()
        self.source = None
        if jax.process_index() == 0:
            print(f"resumed from checkpoint {Path(manager.directory) / str(step)} (step {step})", flush=True)
        return {**state, **restored["train"], "params": restored["params"]}

    def save(self, step: int, state: dict, loader, val_loss: float | None = None, *, final: bool = False) -> None:
        """Start an asynchronous save at every checkpoint.every_steps-th step (the last step only with final=True)."""
        if self.manager is None or not (final or self.due(step)):
            return
        self.wait()
        if step in self.manager.all_steps():  # the final save of a run that had already finished
            return
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train=ocp.args.StandardSave({k: v for k, v in state.items() if k not in NOT_IN_TRAIN_ITEM}),
            data=ocp.args.JsonSave(loader.get_state()), config=ocp.args.JsonSave(self.config),
            meta=ocp.args.JsonSave(self.meta))
        self._pending = step
        with self._errors():
            self.manager.save(step, args=args, metrics=None if val_loss is None else {"val_loss": float(val_loss)})

    def due(self, step: int) -> bool:
        """Whether a save at `step` (steps done) falls on the checkpoint.every_steps cadence (the final save aside)."""
        return self.manager is not None and bool(self.every) and step % self.every == 0 and step < self.total_steps

    def wait(self) -> None:
        """Block until the save in flight is complete (its failure is raised here)."""
        if self.manager is not None and self._pending is not None:
            with self._errors():
                self.manager.wait_until_finished()
            self._pending = None

    def close(self) -> None:
        """Wait for the save in flight, then stop the managers' background work; safe to call twice."""
        try:
            self.wait()
        finally:
            if self.source is not None and self.source[0] is not self.manager:
                self.source[0].close()
            if self.manager is not None:
                _close(self.manager)
            self.manager = self.source = None

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax and tensorstore raise many types; one clear line for all
            raise CheckpointError(
                f"saving checkpoint step {self._pending} under {self.directory} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); earlier checkpoints are intact (steps "
                f"{_steps(self.directory)}); check free disk space and write permission"
            ) from e


def save_params_checkpoint(model: nnx.Module, out_dir, *, model_path: str, overwrite: bool = False) -> Path:
    """Write the model's parameters as an Orbax checkpoint (step 0, items params and meta), atomically: into a
    temporary sibling renamed when complete; a non-empty out_dir is refused unless overwrite. One process."""
    tmp = prepare_output_dir(out_dir, overwrite)
    try:
        params = split_model(model, bool(adapters(model)))[1]
        manager = _manager(tmp)
        try:
            manager.save(0, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                meta=ocp.args.JsonSave(model_meta(model, model_path, kind="params"))))
        finally:
            _close(manager)
        commit_output_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def load_checkpoint_model(checkpoint, *, mesh=None) -> tuple[nnx.Module, dict]:
    """(model, meta item) of a checkpoint, on `mesh` (one device if None): the base from its model path with the
    saved adapters (LoRA), or the saved parameters in a model built from the saved HF config (full)."""
    from automodel_jax.parallel.sharding import make_mesh
    root, step = locate(checkpoint)
    manager, where, mesh = _manager(root, create=False), root / str(step), mesh or make_mesh()
    meta = _read_json(manager, step, ["meta"])["meta"]
    base = meta["model_path"]
    lora = meta["peft"]["method"] == "lora"
    scanned = dict(scan_layers=True) if meta.get("scan_layers") else {}  # the layout its parameters were saved in
    if lora:  # the base in float32: merged kernels are then rounded once, to the checkpoint's dtypes on export
        model = load_pretrained(base, dtype=jnp.float32, param_dtype=jnp.float32, mesh=mesh,
                                model_overrides=scanned or None)
        check_compatible(meta, {**model_meta(model, base), "peft": meta["peft"]}, where)
        peft = meta["peft"]
        apply_lora(model, r=peft["r"], alpha=peft["alpha"], dropout=peft["dropout"], target_modules=peft["targets"])
    else:
        dtype = jnp.dtype(meta["param_dtype"])
        model = nnx.eval_shape(lambda: build_model(meta["hf_config"], dtype=dtype, param_dtype=dtype, **scanned))
    graphdef, params, frozen = split_model(model, lora)
    target = _abstract(params, tree_shardings(model, params, mesh))
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    manager.close()
    model = nnx.merge(graphdef, restored, frozen)
    if not lora:
        if not Path(base).is_dir():
            log.warning("base model directory %s is gone: the export gets no tokenizer or generation config", base)
        model.hf_source = HFSource(base if Path(base).is_dir() else None, json.dumps(meta["hf_config"]),
                                   tuple(sorted(meta["hf_dtypes"].items())))
    return model, meta
