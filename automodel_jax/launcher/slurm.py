"""Render and submit the sbatch script that runs a training program on every task of a Slurm job.

The script exports COORDINATOR_ADDRESS (first host of the job's node list, port derived from the job id the same
way `cluster.derive_port` does) and starts one process per task with srun; each process then joins the cluster
through `initialize_distributed()`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from automodel_jax.launcher.cluster import PORT_BASE, PORT_SPAN

DEFAULT_MODULE = "automodel_jax.finetune"
SCRIPT_NAME = "sbatch.sh"
_SLURM_TIME = re.compile(r"(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)")
_SBATCH_VALUE = re.compile(r"[^\s'\"\\]+")


class LaunchConfigError(ValueError):
    """A launcher option is invalid; the message names the option and what it accepts."""


class SlurmError(RuntimeError):
    """Slurm is missing or refused the job; the message says which and why."""


@dataclass(frozen=True)
class SlurmJob:
    """Everything that goes into one sbatch script. `program` (a .py file) replaces `module` when set."""

    config: str
    overrides: tuple[str, ...]
    run_dir: Path
    workdir: Path
    python: str
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    partition: str | None = None
    time: str | None = None
    container_image: str | None = None
    container_mounts: str | None = None
    cpu_devices_per_task: int | None = None
    module: str = DEFAULT_MODULE
    program: str | None = None
    job_name: str = "automodel-jax"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise LaunchConfigError(f"--nodes {self.nodes}: need at least 1 node")
        if self.gpus_per_node < 0:
            raise LaunchConfigError(f"--gpus-per-node {self.gpus_per_node}: must be >= 0 (0 means CPU only)")
        if self.tasks_per_node < 1:
            raise LaunchConfigError(f"--tasks-per-node {self.tasks_per_node}: need at least 1 task per node")
        if self.gpus_per_node and self.gpus_per_node % self.tasks_per_node:
            raise LaunchConfigError(
                f"--gpus-per-node {self.gpus_per_node} is not divisible by --tasks-per-node {self.tasks_per_node}; "
                "use 1 task per node or one task per GPU"
            )
        if self.cpu_devices_per_task is not None:
            if self.gpus_per_node:
                raise LaunchConfigError("--cpu-devices-per-task only applies with --gpus-per-node 0 (CPU jobs)")
            if self.cpu_devices_per_task < 1:
                raise LaunchConfigError(f"--cpu-devices-per-task {self.cpu_devices_per_task}: must be >= 1")
        if self.time is not None and not _SLURM_TIME.fullmatch(self.time):
            raise LaunchConfigError(
                f"--time {self.time!r}: use Slurm's format, e.g. 30, 04:00:00 or 1-12:00:00"
            )
        for flag, value in (
            ("--partition", self.partition),
            ("--job-name", self.job_name),
            ("--run-dir", str(self.run_dir)),
            ("working directory", str(self.workdir)),
        ):
            if value is not None and not _SBATCH_VALUE.fullmatch(value):
                raise LaunchConfigError(f"{flag} {value!r}: must be non-empty, without spaces or quotes")
        if not self.module and not self.program:
            raise LaunchConfigError("--module is empty: name the Python module to run, e.g. automodel_jax.finetune")

    @property
    def script_path(self) -> Path:
        return self.run_dir / SCRIPT_NAME

    def log_path(self, job_id: str) -> Path:
        return self.run_dir / f"slurm-{job_id}.out"


def _program_command(job: SlurmJob) -> list[str]:
    entry = [job.program] if job.program else ["-m", job.module]
    return [job.python, *entry, "--config", job.config, f"--config.run_dir={job.run_dir}", *job.overrides]


def render_sbatch_script(job: SlurmJob) -> str:
    """The sbatch script text for `job`; values are validated or shell-quoted, so the script is safe to run."""
    directives = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.tasks_per_node}",
    ]
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.time:
        directives.append(f"--time={job.time}")
    directives += [f"--output={job.run_dir}/slurm-%j.out", f"--chdir={job.workdir}"]

    environment = [
        f'export COORDINATOR_PORT="${{COORDINATOR_PORT:-$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))}}"',
        'export COORDINATOR_ADDRESS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):${COORDINATOR_PORT}"',
    ]
    if not job.gpus_per_node:
        environment.append("export JAX_PLATFORMS=cpu")
    if job.cpu_devices_per_task:
        flag = f"--xla_force_host_platform_device_count={job.cpu_devices_per_task}"
        environment.append(f'export XLA_FLAGS="${{XLA_FLAGS:+$XLA_FLAGS }}{flag}"')

    srun = ["srun", "--kill-on-bad-exit=1", "--label"]
    if job.container_image:
        srun.append(f"--container-image={job.container_image}")
        srun.append(f"--container-workdir={job.workdir}")
        if job.container_mounts:
            srun.append(f"--container-mounts={job.container_mounts}")
    command = " \\\n    ".join(shlex.join(part) for part in (srun, _program_command(job)))

    return "\n".join(
        [
            "#!/bin/bash",
            f"# Written by `python -m automodel_jax.launch slurm`; resubmit with: sbatch {job.script_path}",
            *(f"#SBATCH {directive}" for directive in directives),
            "set -euo pipefail",
            "",
            "# Every task joins JAX's coordinator on the first node; initialize_distributed() reads these.",
            *environment,
            'echo "[launch] job ${SLURM_JOB_ID}: ${SLURM_JOB_NUM_NODES} node(s), ${SLURM_NTASKS} task(s), '
            'coordinator ${COORDINATOR_ADDRESS}"',
            "",
            command,
            "",
        ]
    )


def submit(job: SlurmJob) -> str:
    """Write the script into the run dir, submit it with sbatch and return the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch not found on PATH: run on a Slurm login node, or use --dry-run to see the script")
    job.run_dir.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(render_sbatch_script(job))
    job.script_path.chmod(0o755)
    result = subprocess.run([sbatch, "--parsable", str(job.script_path)], capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}").splitlines()[-1]
        raise SlurmError(f"sbatch rejected {job.script_path}: {reason}")
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {result.stdout.strip()!r}, expected a job id")
    return job_id
