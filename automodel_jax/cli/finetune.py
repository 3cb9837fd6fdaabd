"""`python -m automodel_jax.finetune --config FILE[:PRESET] [--config.KEY=VALUE ...]`: run the fine-tuning recipe.

The config decides the recipe: a config built from the VLM recipe's defaults (it has the `vlm` key) runs
vision-language fine-tuning (`automodel_jax.recipes.vlm.finetune`), every other one LLM fine-tuning
(`automodel_jax.recipes.llm.finetune`).
"""
from __future__ import annotations

import logging
import shlex
import sys

from automodel_jax.cli import BAD_INPUT, exit_code
from automodel_jax.config import parse_config
from automodel_jax.launcher.distributed import DistributedInitError
from automodel_jax.recipes.llm import finetune as llm
from automodel_jax.recipes.vlm import finetune as vlm
from automodel_jax.training.interrupt import SignalStop
from automodel_jax.training.loop import TrainingError


def main(argv: list[str] | None = None) -> int:
    # force: grain/orbax import absl, which installs a root handler at WARNING before we get here.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = sys.argv[1:] if argv is None else list(argv)
    return exit_code(lambda: run_interruptible(parse_config(args)), BAD_INPUT + (TrainingError, DistributedInitError),
                     rerun=f"python -m automodel_jax.finetune {shlex.join(args)}")


def run(cfg) -> dict:
    """The recipe the config belongs to, run."""
    return (vlm if cfg.get("vlm") else llm).run(cfg)


def run_interruptible(cfg) -> dict:
    """`run` with SIGINT and train.preemption_signal handled: in the train loop they stop after the current step
    with a checkpoint, elsewhere at once; both raise `Interrupted`."""
    with SignalStop(cfg.train.preemption_signal):
        return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
