"""`python -m automodel_jax.launch slurm ...`: write a multi-node sbatch script for a fine-tuning run and submit it.

Config overrides use the recipe's own syntax (`--config.key=value`, `--config.key value`, bare `--config.flag`) and
are passed through to every task. For the fine-tuning module the config is checked here first, as `finetune` checks it
(file, preset, keys, value types, the recipe's choices; no model or data is loaded), so a mistake is an error now
rather than after the job waited in the queue.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from automodel_jax.cli.finetune import load_config
from automodel_jax.config import ConfigError
from automodel_jax.launcher.slurm import DEFAULT_MODULE, LaunchConfigError, SlurmError, SlurmJob, render_sbatch_script
from automodel_jax.launcher.slurm import submit

_RUN_DIR_OVERRIDE = "--config.run_dir="


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m automodel_jax.launch", allow_abbrev=False, description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    slurm = commands.add_parser(
        "slurm",
        allow_abbrev=False,
        help="write an sbatch script into the run dir and submit it",
        epilog="Any --config.key=value (or --config.key value, or bare --config.flag) arguments are passed to the "
        "program as config overrides.",
    )
    slurm.add_argument("--config", required=True, help="config file, optionally with a preset: CFG[:preset]")
    slurm.add_argument("--nodes", type=int, required=True)
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="0 runs on CPU (no GPU request)")
    slurm.add_argument("--tasks-per-node", type=int, default=1, help="1 (default) or one task per GPU")
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="Slurm time limit, e.g. 04:00:00")
    slurm.add_argument("--container-image", help="pyxis image for srun (the batch script itself runs on the host)")
    slurm.add_argument("--container-mounts", help="pyxis mounts, e.g. /data:/data")
    slurm.add_argument("--run-dir", type=Path, help="outputs, script and logs; default runs/<job-name>-<time>")
    slurm.add_argument("--cpu-devices-per-task", type=int, help="CPU jobs: XLA host devices per task")
    slurm.add_argument("--job-name", default="automodel-jax")
    entry = slurm.add_mutually_exclusive_group()
    entry.add_argument("--module", default=DEFAULT_MODULE, help=f"module run with python -m (default {DEFAULT_MODULE})")
    entry.add_argument("--program", help="a .py file to run instead of --module")
    slurm.add_argument("--python", help="interpreter on the nodes; default this one, or python3 in a container")
    slurm.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    return parser


def _split_overrides(extra: Sequence[str]) -> tuple[list[str], str | None]:
    """Config overrides in the recipe's forms (--config.k=v, --config.k v, bare --config.flag), normalised to
    --config.k=v where a value is given, minus --config.run_dir, which is returned separately."""
    overrides, run_dir, tokens = [], None, list(extra)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--config."):
            raise LaunchConfigError(f"unrecognised argument {token!r}: config overrides look like --config.key=value")
        if "=" not in token and tokens and not tokens[0].startswith("--"):
            token = f"{token}={tokens.pop(0)}"
        if token.startswith(_RUN_DIR_OVERRIDE):
            run_dir = token[len(_RUN_DIR_OVERRIDE) :]
        elif token == _RUN_DIR_OVERRIDE.rstrip("="):
            raise LaunchConfigError("--config.run_dir needs a value, e.g. --config.run_dir=runs/exp1 (or --run-dir)")
        else:
            overrides.append(token)
    return overrides, run_dir


def _resolve_run_dir(args: argparse.Namespace, override: str | None) -> Path:
    if args.run_dir is not None and override is not None and Path(override).resolve() != args.run_dir.resolve():
        raise LaunchConfigError(f"--run-dir {args.run_dir} and --config.run_dir={override} differ: give one of them")
    chosen = args.run_dir or (Path(override) if override else None)
    if chosen is None:
        chosen = Path("runs") / f"{args.job_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return chosen.resolve()


def _job_from_args(args: argparse.Namespace, extra: Sequence[str]) -> SlurmJob:
    overrides, run_dir_override = _split_overrides(extra)
    config_file = args.config.split(":", 1)[0]
    if not args.container_image and not Path(config_file).is_file():
        raise LaunchConfigError(f"--config {args.config}: file {config_file} not found (relative to {os.getcwd()})")
    if args.program and not args.container_image and not Path(args.program).is_file():
        raise LaunchConfigError(f"--program {args.program}: file not found")
    if args.program is None and args.module == DEFAULT_MODULE:
        if Path(config_file).is_file():
            load_config(["--config", args.config, *overrides])
        else:
            print(f"note: --config {config_file} is not on this host (inside --container-image only), so it is "
                  "checked only when the job starts", file=sys.stderr)
    return SlurmJob(
        config=args.config,
        overrides=tuple(overrides),
        run_dir=_resolve_run_dir(args, run_dir_override),
        workdir=Path.cwd(),
        python=args.python or ("python3" if args.container_image else sys.executable),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        partition=args.partition,
        time=args.time,
        container_image=args.container_image,
        container_mounts=args.container_mounts,
        cpu_devices_per_task=args.cpu_devices_per_task,
        module=args.module,
        program=args.program,
        job_name=args.job_name,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad options, 1 when Slurm fails)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    try:
        job = _job_from_args(args, extra)
        if args.dry_run:
            print(render_sbatch_script(job), end="")
            return 0
        job_id = submit(job)
    except (LaunchConfigError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SlurmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Submitted Slurm job {job_id}")
    print(f"  script: {job.script_path}")
    print(f"  log:    {job.log_path(job_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
