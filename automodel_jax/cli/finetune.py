"""`python -m automodel_jax.finetune --config FILE[:PRESET] [--config.KEY=VALUE ...]`: run the fine-tuning recipe.

A NeMo Automodel YAML recipe runs as it is: `--config recipe.yaml [--section.key VALUE ...]` (see
`automodel_jax.config.nemo_yaml`); the mapping it made is printed before the run starts.

The config decides the recipe: a config built from the VLM recipe's defaults (it has the `vlm` key) runs
vision-language fine-tuning (`automodel_jax.recipes.vlm.finetune`), every other one LLM fine-tuning
(`automodel_jax.recipes.llm.finetune`). `--help` lists the config files and presets; `--print-config` prints every
key of a config with its type and value, and loads no model.
"""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

from automodel_jax.cli import BAD_INPUT, exit_code
from automodel_jax.config import (ConfigError, UnknownConfigKey, config_file_presets, describe_config, has_key,
                                  parse_config)
from automodel_jax.config.cache import enable_compilation_cache
from automodel_jax.config.nemo_yaml import parse_nemo_yaml, yaml_config_path
from automodel_jax.launcher.distributed import DistributedInitError
from automodel_jax.recipes.llm import finetune as llm
from automodel_jax.recipes.vlm import finetune as vlm
from automodel_jax.training.interrupt import SignalStop
from automodel_jax.training.loop import TrainingError
from automodel_jax.training.trainer import completed_run, mark_complete

PROG = "python -m automodel_jax.finetune"
PRINT_CONFIG = "--print-config"
# The config files shipped with the project (beside the package in a source checkout).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def help_text() -> str:
    """The command's usage: how to choose a config and override it, the config files and their presets."""
    lines = [f"usage: {PROG} --config FILE[:PRESET] [--config.KEY=VALUE ...] [{PRINT_CONFIG}]", "",
             "Fine-tune a model with LoRA or full SFT as the config file says (the LLM or the VLM recipe).", "",
             "options:",
             "  --config FILE[:PRESET]  a config file (Python, get_config(preset)) and one of its presets",
             "  --config RECIPE.yaml    a NeMo Automodel LLM recipe, run as it is (overrides: --section.key VALUE); "
             "the mapping to our keys is printed",
             "  --config.KEY=VALUE      override one config key (dotted, e.g. --config.optim.learning_rate=3e-4); a "
             "misspelt key is an error naming the closest one",
             f"  {PRINT_CONFIG}          print every key of the config (after overrides) with its type and value, "
             "and exit; loads no model or data",
             "  -h, --help              show this help and exit", ""]
    if CONFIG_DIR.is_dir():
        lines.append(f"config files in {CONFIG_DIR} (give a preset after ':'; '' or none is the file's default):")
        for path in sorted(CONFIG_DIR.glob("*.py")):
            presets, summary = config_file_presets(path)
            name = f"{path.relative_to(CONFIG_DIR.parent)}"
            lines.append(f"  {name:<27} {summary}; presets: {', '.join(repr(p) for p in presets)}")
        lines.append("")
    lines += [f"Every key with its default and type: {PROG} --config configs/llama_lora.py {PRINT_CONFIG}",
              "Rerunning a command on the same run_dir resumes from its latest checkpoint."]
    return "\n".join(lines)


def recipe_of(cfg):
    """(name, module) of the recipe a config belongs to: the VLM recipe's configs carry its `vlm` marker."""
    return ("VLM", vlm) if "vlm" in cfg else ("LLM", llm)


def other_recipes_key(error: UnknownConfigKey) -> ConfigError:
    """An unknown key that the other recipe has (FP8 or packing asked of a VLM config, a VLM key of an LLM config)
    said as such; any other unknown key as it was."""
    name, _ = recipe_of(error.cfg)
    other, module = ("LLM", llm) if name == "VLM" else ("VLM", vlm)
    if not has_key(module.default_config(), error.key):
        return error
    return ConfigError(f"config key '{error.key}' is one of the {other} recipe's, and this config runs the {name} "
                       f"recipe, which does not have it: remove --config.{error.key}, or use {'an' if other == 'LLM' else 'a'} "
                       f"{other} config file "
                       f"(see {PROG} --help)")


def load_config(argv: list[str]):
    """The locked config of a finetune command line (a Python config file, or a NeMo Automodel YAML recipe translated
    by `automodel_jax.config.nemo_yaml`), checked as far as it can be without a model or data: the file,
    preset, keys and value types, and the recipe's choices. ConfigError (a ValueError) naming the bad thing; a key
    that only the other recipe has is said so."""
    if yaml_config_path(argv) is None:
        try:
            cfg = parse_config(argv)
        except UnknownConfigKey as e:
            raise other_recipes_key(e) from None
    else:  # a NeMo Automodel YAML recipe: translated, the mapping printed
        cfg, translation = parse_nemo_yaml(argv, llm.default_config())
        print(translation.report(), flush=True)
        for warning in translation.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    recipe_of(cfg)[1].check_run_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 for --help, --print-config and a complete run; 2 for bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(help_text())
        return 0
    # force: grain/orbax import absl, which installs a root handler at WARNING before we get here.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rerun = f"python -m automodel_jax.finetune {shlex.join(args)}"
    if PRINT_CONFIG in args:
        return exit_code(lambda: print(describe_config(load_config([a for a in args if a != PRINT_CONFIG]))))
    return exit_code(lambda: run_interruptible(start_process(load_config(args))),
                     BAD_INPUT + (TrainingError, DistributedInitError), rerun=rerun)


def start_process(cfg):
    """The process-wide settings a run needs before anything compiles (JAX's persistent compilation cache, as
    train.compilation_cache and train.compilation_cache_dir say); returns `cfg`."""
    enable_compilation_cache(cfg.train.compilation_cache, cfg.train.compilation_cache_dir,
                             fix="set train.compilation_cache_dir to a writable directory, or "
                                 "train.compilation_cache=false")
    return cfg


def run(cfg) -> dict:
    """The recipe the config belongs to, run; a run that already finished with this config is reported as complete
    and not run again (an empty result)."""
    done = completed_run(cfg)
    if done:
        print(done, flush=True)
        return {}
    given = cfg.to_dict()
    result = recipe_of(cfg)[1].run(cfg)
    mark_complete(given, result["steps"])
    return result


def run_interruptible(cfg) -> dict:
    """`run` with SIGINT and train.preemption_signal handled: in the train loop they stop after the current step
    with a checkpoint, elsewhere at once; both raise `Interrupted`."""
    with SignalStop(cfg.train.preemption_signal):
        return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
