"""`python -m automodel_jax.finetune --config FILE[:PRESET] [--config.KEY=VALUE ...]`: run the fine-tuning recipe.

A NeMo Automodel YAML recipe runs as it is: `--config recipe.yaml [--section.key VALUE ...]` (see
`automodel_jax.config.nemo_yaml`); the mapping it made is printed before the run starts.

The config decides the recipe: a config built from the VLM recipe's defaults (it has the `vlm` key) runs
vision-language fine-tuning (`automodel_jax.recipes.vlm.finetune`), every other one LLM fine-tuning
(`automodel_jax.recipes.llm.finetune`).
"""
from __future__ import annotations

import logging
import sys

from automodel_jax.cli import BAD_INPUT, exit_code
from automodel_jax.config import parse_config
from automodel_jax.config.nemo_yaml import parse_nemo_yaml, yaml_config_path
from automodel_jax.launcher.distributed import DistributedInitError
from automodel_jax.recipes.llm import finetune as llm
from automodel_jax.recipes.vlm import finetune as vlm
from automodel_jax.training.loop import TrainingError


def main(argv: list[str] | None = None) -> int:
    # force: grain/orbax import absl, which installs a root handler at WARNING before we get here.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    return exit_code(lambda: run(parse(argv)), BAD_INPUT + (TrainingError, DistributedInitError))


def parse(argv: list[str]):
    """The run's config: from a Python config file, or translated from a NeMo Automodel YAML recipe."""
    if yaml_config_path(argv) is None:
        return parse_config(argv)
    cfg, translation = parse_nemo_yaml(argv, llm.default_config())
    print(translation.report(), flush=True)
    for warning in translation.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return cfg


def run(cfg) -> dict:
    """The recipe the config belongs to, run."""
    return (vlm if cfg.get("vlm") else llm).run(cfg)


if __name__ == "__main__":
    sys.exit(main())
