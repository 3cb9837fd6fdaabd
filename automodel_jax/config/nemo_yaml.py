"""NeMo Automodel YAML recipes, run as they are: ``--config recipe.yaml [--section.key value | --section.key=value]``.

Translates the ported system's LLM fine-tuning schema (``step_scheduler``, ``model``, ``peft``, ``dataset``,
``validation_dataset``, ``optimizer``, ``lr_scheduler``, ``checkpoint``, ``distributed``, ``loss_fn``,
``packed_sequence``, ...) into this project's config, starting from the recipe's ``default_config()``.

* The file is read with ``yaml.safe_load``; ``_target_`` values are matched against the tables below and nothing
  named in the file is ever imported or executed.
* Every key is handled one of three ways: mapped (reported as ``their.key -> our.key = value``), ignored with a
  one-line warning when it cannot change results (launcher, logger, kernel and save-format settings), or refused
  with a ``ConfigError`` naming the key when it would change results and has no equivalent here.
* Where the file leaves a setting out, the ported system's default is used when it differs from ours (torch's
  optimizer defaults; the LR scheduler's ``min_lr = lr / 100``; unshuffled data without a ``dataloader.shuffle``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from ml_collections import ConfigDict

from automodel_jax.config import ConfigError

_DATASETS_LLM = "nemo_automodel.components.datasets.llm."
MODEL_TARGETS = ("nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained",
                 "nemo_automodel._transformers.NeMoAutoModelForCausalLM.from_pretrained")
PEFT_TARGETS = ("nemo_automodel.components._peft.lora.PeftConfig",)
OPTIMIZER_TARGETS = {"torch.optim.Adam": "adam", "torch.optim.AdamW": "adamw"}
# torch.optim defaults, which apply where the file leaves a value out (AdamW's weight decay differs from Adam's).
TORCH_DEFAULTS = {"adam": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
                  "adamw": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)}
# Both compute the same masked, token-averaged cross entropy; the fused one never materialises all logits (chunked).
LOSS_TARGETS = {"nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy": "naive",
                "nemo_automodel.components.loss.linear_ce.FusedLinearCrossEntropy": "chunked"}
DATASET_TARGETS = {
    _DATASETS_LLM + "squad.make_squad_dataset": "squad",
    _DATASETS_LLM + "hellaswag.HellaSwag": "hellaswag",
    _DATASETS_LLM + "column_mapped_text_instruction_dataset.ColumnMappedTextInstructionDataset": "instruction",
    _DATASETS_LLM + "chat_dataset.ChatDataset": "chat",
    _DATASETS_LLM + "mock.build_unpacked_dataset": "mock",
}
# Per dataset kind: their argument -> our dataset key ("seq_len" is the run's data.seq_len).
DATASET_ARGS = {
    "squad": dict(dataset_name="path", split="split", limit_dataset_samples="limit", seq_length="seq_len"),
    "hellaswag": dict(path_or_dataset="path", split="split", num_samples_limit="limit"),
    "instruction": dict(path_or_dataset_id="path", split="split", limit_dataset_samples="limit",
                        column_mapping="columns", seq_length="seq_len"),
    "chat": dict(path_or_dataset_id="path", split="split", limit_dataset_samples="limit", seq_length="seq_len",
                 chat_template="chat_template"),
    "mock": dict(num_sentences="num_samples", vocab_size="vocab_size", seed="seed"),
}
SCHEDULES = {"constant": "constant", "linear": "linear", "cosine": "cosine", "WSD": "wsd"}
DISTRIBUTED_TARGETS = ("nemo_automodel.components.distributed.fsdp2.FSDP2Manager",)
# Settings that cannot change the numbers a run produces: (section or section.key) -> why it is not needed here.
NO_EFFECT = {
    "recipe": "the config decides the recipe here",
    "dist_env.backend": "processes talk through jax.distributed",
    "rng.ranked": "one seed drives every process here",
    "model.attn_implementation": "attention is chosen by model.attention",
    "model.use_liger_kernel": "kernels are chosen by this project",
    "model.use_sdpa_patching": "kernels are chosen by this project",
    "peft.use_triton": "LoRA runs through XLA here",
    "distributed.sequence_parallel": "the mesh decides activation sharding",
    "distributed_config": "parameters are sharded over the mesh's fsdp axis",
    "dataloader.num_workers": "the loader is grain's",
    "dataloader.pin_memory": "the loader is grain's",
    "dataloader.persistent_workers": "the loader is grain's",
    "dataloader.drop_last": "the loader cuts whole global batches",
    "validation_dataloader": "validation batches are micro_batch_size x data-parallel rows",
    "optimizer.foreach": "an implementation choice of torch",
    "optimizer.fused": "an implementation choice of torch",
    "checkpoint.model_save_format": "checkpoints are Orbax; the export is safetensors",
    "checkpoint.save_consolidated": "the export is one consolidated safetensors model",
    "checkpoint.dequantize_base_checkpoint": "the export is unquantised",
    "wandb": "set logging.wandb in a Python config to log to W&B",
    "mlflow": "MLflow logging is not available here",
    "ci": "CI settings of the ported system",
    "compile": "XLA compiles every step",
    "fp8.enable_fsdp_float8_all_gather": "XLA chooses how sharded weights are gathered",
    "fp8.precompute_float8_dynamic_scale_for_fsdp": "XLA chooses how sharded weights are gathered",
    "fp8.force_recompute_fp8_weight_in_bwd": "the backward reuses the forward's FP8 weight here",
}
ACCEPTED = {  # their _target_ helpers whose defaults are what this project does anyway
    "rng._target_": ("nemo_automodel.components.training.rng.StatefulRNG",),
    "dataloader._target_": ("torchdata.stateful_dataloader.StatefulDataLoader",),
    "dataloader.collate_fn": ("nemo_automodel.components.datasets.utils.default_collater",),
}


@dataclasses.dataclass
class Translation:
    """What translating a recipe did: ``mapping`` of (their key, our key, value) and one-line ``warnings``."""
    mapping: list[tuple[str, str, Any]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def report(self) -> str:
        """The mapping as printable lines, one per key set."""
        width = max((len(theirs) for theirs, _, _ in self.mapping), default=0)
        lines = ["NeMo Automodel recipe -> automodel_jax config:"]
        lines += [f"  {theirs:<{width}} -> {ours} = {_shorten(repr(value))}" for theirs, ours, value in self.mapping]
        return "\n".join(lines)


def yaml_config_path(argv: Sequence[str]) -> str | None:
    """The ``--config``/``-c`` value of ``argv`` when it names a ``.yaml``/``.yml`` file, else None."""
    for i, arg in enumerate(argv):
        name, has_value, value = arg.partition("=")
        if name in ("--config", "-c"):
            value = value if has_value else (argv[i + 1] if i + 1 < len(argv) else "")
            return value if value.lower().endswith((".yaml", ".yml")) else None
    return None


def parse_nemo_yaml(argv: Sequence[str], base: ConfigDict) -> tuple[ConfigDict, Translation]:
    """Reads ``--config recipe.yaml`` plus ``--section.key value`` overrides into ``base`` (the recipe's defaults,
    changed in place); returns it locked, with the translation. Raises ConfigError naming any bad key or value."""
    path, overrides = _split_argv(list(argv))
    recipe = load_yaml(path)
    for key, value in overrides:
        _override(recipe, key, value)
    translation = Translation()
    _Translator(recipe, base, translation).run()
    base.lock()
    return base, translation


def load_yaml(path: str) -> dict:
    """The recipe file's mapping, through ``yaml.safe_load`` (plain data only: no tags, no objects)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        recipe = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(recipe, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (step_scheduler, model, ...)")
    return recipe


def _split_argv(argv: list[str]) -> tuple[str, list[tuple[str, Any]]]:
    """``(recipe path, [(dotted key, value parsed as YAML)])``; a bare ``--key`` means true."""
    path, overrides = None, []
    while argv:
        arg = argv.pop(0)
        name, has_value, value = arg.partition("=")
        if not has_value and argv and not argv[0].startswith("--"):  # "--key -1" takes -1
            value, has_value = argv.pop(0), True
        if name in ("--config", "-c"):
            path = value
        elif name.startswith("--") and len(name) > 2:
            overrides.append((name[2:], yaml.safe_load(value) if has_value else True))
        else:
            raise ConfigError(f"unexpected argument '{arg}'; expected --config recipe.yaml and --section.key VALUE "
                              "overrides")
    return path, overrides


def _override(recipe: dict, key: str, value: Any) -> None:
    """Sets dotted ``key`` in the raw recipe (creating sections), before translation checks every key."""
    *sections, name = key.split(".")
    node = recipe
    for i, section in enumerate(sections):
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override --{key}: '{'.'.join(sections[:i + 1])}' is a value, not a section")
        node = child
    node[name] = value


class _Translator:
    """Walks the recipe section by section; every key it reads is consumed, and any key left over is refused."""

    def __init__(self, recipe: dict, cfg: ConfigDict, out: Translation):
        self.recipe, self.cfg, self.out = recipe, cfg, out

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def set(self, theirs: str, ours: str, value: Any) -> None:
        *sections, name = ours.split(".")
        node = self.cfg
        for section in sections:
            node = node[section]
        try:
            node[name] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{theirs}: {value!r} does not fit {ours} ({e})") from None
        self.out.mapping.append((theirs, ours, value))

    def section(self, name: str) -> dict:
        value = self.recipe.pop(name, None)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be a section (a mapping of keys), got {value!r:.60}")
        return dict(value)

    def leftover(self, name: str, section: dict, known: Sequence[str]) -> None:
        """Warns about the keys of ``section`` that cannot change results; refuses every other one left."""
        for key in list(section):
            why = NO_EFFECT.get(f"{name}.{key}")
            if why is not None:
                self.out.warnings.append(f"{name}.{key} is ignored: {why}")
                del section[key]
        for key, value in section.items():
            accepted = ACCEPTED.get(f"{name}.{key}")
            if accepted is not None and value in accepted:
                continue
            if accepted is not None:
                raise ConfigError(f"{name}.{key}: {value!r} is not supported; supported: {', '.join(accepted)}")
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; supported keys: {', '.join(known)}"
            raise ConfigError(f"{name}.{key} has no equivalent in automodel_jax and would change results{hint}")

    def target(self, name: str, section: dict, supported: Sequence[str], required: bool = True) -> str | None:
        target = section.pop("_target_", None)
        if target is None and not required:
            return None
        if target not in supported:
            raise ConfigError(f"{name}._target_ {target!r} is not supported (nothing from the file is imported); "
                              f"supported: {', '.join(supported)}")
        return target

    # -- sections ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.step_scheduler()
        self.rng()
        self.dist_env()
        self.model()
        self.peft()
        self.distributed()
        self.loss()
        seq_len = self.datasets()
        self.packing(seq_len)
        self.dataloader()
        lr = self.optimizer()
        self.lr_scheduler(lr)
        self.checkpoint()
        self.clip_grad_norm()
        self.fp8()
        for name in list(self.recipe):
            if name in NO_EFFECT:
                self.out.warnings.append(f"{name} is ignored: {NO_EFFECT[name]}")
                del self.recipe[name]
        if self.recipe:
            raise ConfigError(f"section(s) {', '.join(sorted(self.recipe))} have no equivalent in automodel_jax; "
                              "supported: step_scheduler, model, peft, dataset, validation_dataset, packed_sequence, "
                              "dataloader, optimizer, lr_scheduler, loss_fn, distributed, checkpoint, rng, "
                              "clip_grad_norm, dist_env, fp8")

    def step_scheduler(self) -> None:
        section = self.section("step_scheduler")
        keys = dict(global_batch_size="train.global_batch_size", local_batch_size="train.micro_batch_size",
                    max_steps="train.max_steps", num_epochs="train.num_epochs", val_every_steps="train.val_every",
                    ckpt_every_steps="checkpoint.every_steps")
        for theirs, ours in keys.items():
            if theirs in section:
                self.set(f"step_scheduler.{theirs}", ours, _integer(f"step_scheduler.{theirs}", section.pop(theirs),
                                                                    optional=theirs == "max_steps"))
        self.leftover("step_scheduler", section, list(keys))

    def rng(self) -> None:
        section = self.section("rng")
        if "seed" in section:
            self.set("rng.seed", "seed", _integer("rng.seed", section.pop("seed")))
        self.leftover("rng", section, ["_target_", "seed", "ranked"])

    def dist_env(self) -> None:
        section = self.section("dist_env")
        if "timeout_minutes" in section:
            minutes = _integer("dist_env.timeout_minutes", section.pop("timeout_minutes"))
            self.set("dist_env.timeout_minutes", "distributed.timeout_s", minutes * 60)
        self.leftover("dist_env", section, ["backend", "timeout_minutes"])

    def model(self) -> None:
        section = self.section("model")
        self.target("model", section, MODEL_TARGETS)
        if "pretrained_model_name_or_path" not in section:
            raise ConfigError("model.pretrained_model_name_or_path is missing: name the model (a Hub id or a folder)")
        self.set("model.pretrained_model_name_or_path", "model.path", str(section.pop("pretrained_model_name_or_path")))
        if section.pop("trust_remote_code", False) not in (False, None):
            raise ConfigError("model.trust_remote_code: true is refused: automodel_jax never runs code from a model "
                              "repository; use a model whose architecture is supported natively")
        dtype = section.pop("torch_dtype", None)
        if dtype is not None:
            dtype = str(dtype).removeprefix("torch.")
            if dtype in ("float32", "bfloat16"):
                self.set("model.torch_dtype", "model.param_dtype", dtype)
                self.set("model.torch_dtype", "model.dtype", dtype)
            elif dtype != "auto":
                raise ConfigError(f"model.torch_dtype {dtype!r} is not supported; use float32, bfloat16 or auto")
            else:
                self.out.warnings.append("model.torch_dtype=auto: parameters are kept in model.param_dtype="
                                         f"{self.cfg.model.param_dtype} with compute in model.dtype="
                                         f"{self.cfg.model.dtype}")
        self.leftover("model", section, ["_target_", "pretrained_model_name_or_path", "torch_dtype"])

    def peft(self) -> None:
        section = self.section("peft")
        if not section:
            self.set("(no peft section)", "peft.method", "none")
            return
        self.target("peft", section, PEFT_TARGETS)
        self.set("peft._target_", "peft.method", "lora")
        all_linear = section.pop("match_all_linear", False)
        targets = section.pop("target_modules", None)
        if all_linear and targets:
            raise ConfigError("peft: give match_all_linear or target_modules, not both")
        if all_linear:
            self.set("peft.match_all_linear", "peft.target_modules", ("all-linear",))
        elif targets:
            self.set("peft.target_modules", "peft.target_modules", _strings("peft.target_modules", targets))
        else:
            raise ConfigError("peft names no modules: set peft.target_modules (e.g. ['*_proj']) or "
                              "peft.match_all_linear: true")
        if "exclude_modules" in section:
            self.set("peft.exclude_modules", "peft.exclude_modules",
                     _strings("peft.exclude_modules", section.pop("exclude_modules") or []))
        for theirs, ours, kind in (("dim", "r", int), ("alpha", "alpha", float), ("dropout", "dropout", float)):
            if theirs in section:
                value = section.pop(theirs)
                value = _integer(f"peft.{theirs}", value) if kind is int else _number(f"peft.{theirs}", value)
                self.set(f"peft.{theirs}", f"peft.{ours}", value)
        position = section.pop("dropout_position", "pre")
        if position != "pre":
            raise ConfigError(f"peft.dropout_position {position!r} is not supported: dropout applies to the LoRA "
                              "input here ('pre')")
        self.leftover("peft", section, ["_target_", "target_modules", "match_all_linear", "exclude_modules", "dim",
                                        "alpha", "dropout", "dropout_position"])

    def distributed(self) -> None:
        section = self.section("distributed")
        self.target("distributed", section, DISTRIBUTED_TARGETS, required=False)
        sizes = dict(dp_size="mesh.fsdp", dp_replicate_size="mesh.data", tp_size="mesh.tensor",
                     cp_size="mesh.context")
        for theirs, ours in sizes.items():
            if theirs in section:
                value = section.pop(theirs)
                none = value is None or str(value).lower() == "none"
                if none and theirs != "dp_size":
                    value = 1
                self.set(f"distributed.{theirs}", ours, -1 if none else _integer(f"distributed.{theirs}", value))
        for theirs in ("pp_size", "ep_size"):
            value = section.pop(theirs, None)
            if value not in (None, 1, "none"):
                raise ConfigError(f"distributed.{theirs}={value} is not supported: there is no pipeline or expert "
                                  "parallelism here; use dp_size, tp_size and cp_size")
        self.leftover("distributed", section, ["_target_", *sizes, "pp_size", "ep_size", "sequence_parallel"])

    def loss(self) -> None:
        section = self.section("loss_fn")
        target = self.target("loss_fn", section, list(LOSS_TARGETS), required=False)
        target = target or next(iter(LOSS_TARGETS))  # their default: MaskedCrossEntropy
        self.set(f"loss_fn._target_ ({target.rsplit('.', 1)[-1]})", "loss.impl", LOSS_TARGETS[target])
        if section.pop("ignore_index", -100) != -100:
            raise ConfigError("loss_fn.ignore_index must be -100 (the label of unsupervised tokens here)")
        section.pop("fp32_upcast", None)  # the loss is always computed in float32 here
        self.leftover("loss_fn", section, ["_target_", "ignore_index", "fp32_upcast"])

    def datasets(self) -> int | None:
        """dataset -> data.train, validation_dataset -> data.validation; returns their (one) seq_length."""
        lengths = {}
        for theirs, split in (("dataset", "train"), ("validation_dataset", "validation")):
            section = self.section(theirs)
            if not section:
                raise ConfigError(f"the recipe has no '{theirs}' section; this recipe needs one (with its "
                                  f"_target_, e.g. {next(iter(DATASET_TARGETS))})")
            kind = DATASET_TARGETS[self.target(theirs, section, list(DATASET_TARGETS))]
            self.set(f"{theirs}._target_", f"data.{split}.kind", kind)
            args = DATASET_ARGS[kind]
            for arg, ours in args.items():
                if arg not in section:
                    continue
                value, where = section.pop(arg), f"{theirs}.{arg}"
                if ours == "seq_len":
                    lengths[where] = _integer(where, value)
                elif ours == "columns":
                    if not isinstance(value, dict):
                        raise ConfigError(f"{where} must map roles (context, question, answer) to column names")
                    self.set(where, f"data.{split}.columns", {str(k): str(v) for k, v in value.items()})
                elif ours in ("limit", "num_samples", "vocab_size", "seed"):
                    self.set(where, f"data.{split}.{ours}", _integer(where, value))
                else:
                    self.set(where, f"data.{split}.{ours}", str(value))
            if kind == "instruction":
                if section.pop("answer_only_loss_mask", True) is not True:
                    raise ConfigError(f"{theirs}.answer_only_loss_mask: false is not supported: the loss is on the "
                                      "answer only here")
                for arg in ("padding", "truncation"):  # padding/cutting to seq_length is data.seq_len here
                    if arg in section:
                        self.out.warnings.append(f"{theirs}.{arg} is ignored: samples are fitted to data.seq_len")
                        del section[arg]
            self.leftover(theirs, section, ["_target_", *args])
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"the datasets ask for different seq_length {lengths}: one data.seq_len serves both "
                              "here; give them the same value")
        return next(iter(lengths.values()), None)

    def packing(self, seq_len: int | None) -> None:
        section = self.section("packed_sequence")
        size = _integer("packed_sequence.packed_sequence_size", section.pop("packed_sequence_size", 0))
        if size > 0:
            if seq_len is not None and seq_len != size:
                raise ConfigError(f"packed_sequence.packed_sequence_size {size} differs from the datasets' "
                                  f"seq_length {seq_len}: one data.seq_len serves both here; give them the same value")
            self.set("packed_sequence.packed_sequence_size", "data.packing", True)
            self.set("packed_sequence.packed_sequence_size", "data.seq_len", size)
        elif seq_len is not None:
            self.set("dataset.seq_length", "data.seq_len", seq_len)
        else:
            self.out.warnings.append(f"no dataset sets seq_length: samples are cut at data.seq_len="
                                     f"{self.cfg.data.seq_len} (override with --dataset.seq_length N)")
        if section.pop("split_across_pack", False):
            raise ConfigError("packed_sequence.split_across_pack: true is not supported: samples are never split "
                              "across packed rows here")
        self.leftover("packed_sequence", section, ["packed_sequence_size", "split_across_pack"])

    def dataloader(self) -> None:
        section = self.section("dataloader")
        shuffle = section.pop("shuffle", False)  # torch's DataLoader default
        self.set("dataloader.shuffle", "data.shuffle", bool(shuffle))
        self.leftover("dataloader", section, ["_target_", "collate_fn", "shuffle"])

    def optimizer(self) -> float:
        section = self.section("optimizer")
        if not section:
            raise ConfigError(f"the recipe has no 'optimizer' section; add one with _target_ "
                              f"{' or '.join(OPTIMIZER_TARGETS)}")
        name = OPTIMIZER_TARGETS[self.target("optimizer", section, list(OPTIMIZER_TARGETS))]
        self.set("optimizer._target_", "optim.name", name)
        given = {**TORCH_DEFAULTS[name], **section}
        lr = _number("optimizer.lr", given.pop("lr"))
        self.set("optimizer.lr", "optim.learning_rate", lr)
        betas = given.pop("betas")
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"optimizer.betas must be two numbers, got {betas!r}")
        self.set("optimizer.betas[0]", "optim.b1", _number("optimizer.betas", betas[0]))
        self.set("optimizer.betas[1]", "optim.b2", _number("optimizer.betas", betas[1]))
        self.set("optimizer.eps", "optim.eps", _number("optimizer.eps", given.pop("eps")))
        self.set("optimizer.weight_decay", "optim.weight_decay",
                 _number("optimizer.weight_decay", given.pop("weight_decay")))
        if given.pop("amsgrad", False):
            raise ConfigError("optimizer.amsgrad: true is not supported; remove it (plain Adam/AdamW)")
        for key in TORCH_DEFAULTS[name]:
            section.pop(key, None)
        section.pop("amsgrad", None)
        self.leftover("optimizer", section, ["_target_", *TORCH_DEFAULTS[name], "amsgrad"])
        return lr

    def lr_scheduler(self, lr: float) -> None:
        if "lr_scheduler" not in self.recipe:
            self.set("(no lr_scheduler section)", "optim.schedule.name", "constant")
            self.set("(no lr_scheduler section)", "optim.schedule.warmup_steps", 0)
            return
        section = self.section("lr_scheduler")
        style = section.pop("lr_decay_style", "cosine")
        if style not in SCHEDULES:
            raise ConfigError(f"lr_scheduler.lr_decay_style {style!r} is not supported; supported: "
                              f"{', '.join(SCHEDULES)}")
        self.set("lr_scheduler.lr_decay_style", "optim.schedule.name", SCHEDULES[style])
        if "lr_warmup_steps" in section:
            warmup = _integer("lr_scheduler.lr_warmup_steps", section.pop("lr_warmup_steps"))
            self.set("lr_scheduler.lr_warmup_steps", "optim.schedule.warmup_steps", warmup)
        elif self.cfg.train.max_steps and any(m[0] == "step_scheduler.max_steps" for m in self.out.mapping):
            # the ported system's default, min(1000, total_steps // 10), with the run's length known
            warmup = min(1000, self.cfg.train.max_steps // 10)
            self.set("(lr_scheduler.lr_warmup_steps: min(1000, step_scheduler.max_steps // 10))",
                     "optim.schedule.warmup_steps", warmup)
        else:
            raise ConfigError("lr_scheduler.lr_warmup_steps is missing and step_scheduler.max_steps is not set: the "
                              "ported system's default, min(1000, total_steps // 10), then depends on the data's "
                              "length; set it in the file or with --lr_scheduler.lr_warmup_steps N")
        init_lr = _number("lr_scheduler.init_lr", section.pop("init_lr", lr * 0.1))
        if warmup and init_lr:
            self.out.warnings.append(f"lr_scheduler.init_lr={init_lr:g}: warmup starts from 0 here, not from "
                                     "init_lr (set --lr_scheduler.init_lr 0 to silence this)")
        min_lr = _number("lr_scheduler.min_lr", section.pop("min_lr", lr * 0.01))
        self.set("lr_scheduler.min_lr", "optim.schedule.min_learning_rate", min_lr)
        max_lr = section.pop("max_lr", None)
        if max_lr is not None and _number("lr_scheduler.max_lr", max_lr) != lr:
            raise ConfigError(f"lr_scheduler.max_lr {max_lr} differs from optimizer.lr {lr}: the peak learning rate "
                              "is optimizer.lr here; make them equal")
        if section.pop("lr_decay_steps", None) is not None:
            raise ConfigError("lr_scheduler.lr_decay_steps is not supported: the decay always ends at the last "
                              "step here; remove it")
        if section.pop("wd_incr_style", "constant") != "constant":
            raise ConfigError("lr_scheduler.wd_incr_style must be 'constant': weight decay is fixed here")
        for key in ("start_weight_decay", "end_weight_decay", "wd_incr_steps"):
            if key in section:
                raise ConfigError(f"lr_scheduler.{key} is not supported: weight decay is optimizer.weight_decay, "
                                  "fixed for the run")
        self.leftover("lr_scheduler", section, ["lr_decay_style", "lr_warmup_steps", "init_lr", "min_lr", "max_lr"])

    def checkpoint(self) -> None:
        section = self.section("checkpoint")
        if "enabled" in section:
            self.set("checkpoint.enabled", "checkpoint.enabled", bool(section.pop("enabled")))
        if "checkpoint_dir" in section:
            self.set("checkpoint.checkpoint_dir", "run_dir", str(section.pop("checkpoint_dir")))
        if section.get("restore_from") is not None:
            self.set("checkpoint.restore_from", "checkpoint.restore_from", str(section.pop("restore_from")))
        section.pop("restore_from", None)
        self.leftover("checkpoint", section, ["enabled", "checkpoint_dir", "restore_from"])

    def clip_grad_norm(self) -> None:
        section = self.section("clip_grad_norm")
        if "max_norm" in section:
            value = section.pop("max_norm")
            self.set("clip_grad_norm.max_norm", "optim.grad_clip",
                     0.0 if value is None else _number("clip_grad_norm.max_norm", value))
        self.leftover("clip_grad_norm", section, ["max_norm"])

    def fp8(self) -> None:
        """torchao Float8 training (the ported system's `fp8` section) -> model.fp8; recipe_name null is torchao's
        default, tensorwise."""
        section = self.section("fp8")
        if not section:
            return
        if "fp8" not in self.cfg.model:
            raise ConfigError("fp8: FP8 training is supported by the LLM recipe only; remove the fp8 section")
        for key in ("enabled", "emulate"):
            if key in section:
                self.set(f"fp8.{key}", f"model.fp8.{key}", bool(section.pop(key)))
        recipe = section.pop("recipe_name", None) or "tensorwise"
        if recipe != "tensorwise":
            raise ConfigError(f"fp8.recipe_name {recipe!r} is not supported; supported: tensorwise (delayed scaling, "
                              f"which NeMo Automodel's recipes do not name, is model.fp8.recipe=delayed in a Python "
                              f"config)")
        self.set("fp8.recipe_name", "model.fp8.recipe", recipe)
        if "filter_fqns" in section:
            self.set("fp8.filter_fqns", "model.fp8.filter_modules",
                     _strings("fp8.filter_fqns", section.pop("filter_fqns")))
        self.leftover("fp8", section, ["enabled", "recipe_name", "filter_fqns", "emulate"])


def _shorten(text: str, width: int = 100) -> str:
    """``text`` cut to ``width`` characters (a chat template is long), marking the cut."""
    return text if len(text) <= width else f"{text[:width - 20]}... ({len(text)} characters)"


def _number(key: str, value: Any) -> float:
    """A float from YAML, which reads exponent-only forms such as ``1e-8`` as strings."""
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number, got {value!r}") from None


def _integer(key: str, value: Any, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    number = _number(key, value)
    if number != int(number):
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    return int(number)


def _strings(key: str, value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{key} must be a list of module name patterns, got {value!r}")
    return tuple(values)
