"""`python -m automodel_jax.plan --config FILE[:PRESET] [--config.KEY=VALUE ...]`: print the run plan, train nothing.

The same config as `finetune` (LLM recipe). The planner (`automodel_jax.training.plan`) compiles each candidate's
train step on abstract shapes (no weights are loaded; an `embedded:` model is built first, as finetune would) and
prints the table that `--config.plan=auto` would train with: mesh, activation checkpointing, loss, micro-batch x
accumulation, GB per device, estimated (and, with plan.measure_steps, measured) step time, the choice. On a CPU,
give the device memory: --config.plan.device_memory_gb=GB.

The `plan` keys it reads (README "Run planner"): plan.margin (fraction of device memory a plan may use, 0.9),
plan.device_memory_gb (default: the device's own), plan.remat (policies to try: none, full, save_dots),
plan.loss_impl (chunked), plan.mesh_axes (data, fsdp, tensor; add context for long sequences), plan.measure_steps
(0: rank by estimate; N: time N real steps of the best three). `python -m automodel_jax.finetune --config FILE
--print-config` lists every key.
"""
from __future__ import annotations

import logging
import sys

from automodel_jax.cli import exit_code
from automodel_jax.cli.finetune import load_config, recipe_of, start_process
from automodel_jax.config import ConfigError
from automodel_jax.recipes.llm import finetune as llm
from automodel_jax.training.plan import make_plan, required_device_memory

PROG = "python -m automodel_jax.plan"


def print_plan(cfg) -> None:
    """The plan of the config's run, printed; ConfigError for a VLM config (the planner covers the LLM recipe)."""
    name, _ = recipe_of(cfg)
    if name != "LLM":
        raise ConfigError(f"{PROG} plans LLM fine-tuning runs only; this config runs the {name} recipe")
    required_device_memory(cfg.plan)  # before an embedded model is built
    print(make_plan(cfg, llm.resolve_path(cfg.model.path)).table(), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 printed, 2 bad input or nothing fits)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(f"usage: {PROG} --config FILE[:PRESET] [--config.KEY=VALUE ...]\n\n{__doc__}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("automodel_jax.plan").setLevel(logging.INFO)  # a line per compile: planning takes a while
    return exit_code(lambda: print_plan(start_process(load_config(args))))


if __name__ == "__main__":
    sys.exit(main())
