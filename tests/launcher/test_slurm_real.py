"""Real 2-task CPU jobs on the local Slurm started by .ci/slurm_up.sh, submitted through our launcher CLI: a psum
program, and the fine-tuning CLI itself (which must train exactly like one process with the same 4 devices).

The job's final state comes from `scontrol show job` (no accounting database is configured, so no sacct;
slurm_up.sh sets MinJobAge=600 so finished jobs stay visible), and what each rank computed from its output files.
Skips with the setup's reason when slurm_up.sh reported SLURM_UNAVAILABLE or was not run.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_finetune_multiprocess import (CONFIG as FINETUNE_CONFIG, OVERRIDES as FINETUNE_OVERRIDES,
                                         assert_same_training, build_embedded_assets, finetune_command, finish,
                                         one_process_four_devices, start)

REPO = Path(__file__).resolve().parents[2]
STATUS_FILE = Path(os.environ.get("AUTOMODEL_JAX_SLURM_STATUS", "/tmp/automodel_jax_slurm_status"))
PSUM_PROGRAM = ["--module", "tests.launcher.psum_program"]
PSUM_CONFIG = "tests/launcher/psum_config.py"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
JOB_DEADLINE_S = 180
FINETUNE_DEADLINE_S = 480

pytestmark = pytest.mark.slurm


def require_slurm() -> None:
    if not STATUS_FILE.is_file():
        pytest.skip(f"SLURM_UNAVAILABLE: no {STATUS_FILE}; run .ci/slurm_up.sh as root first")
    status = STATUS_FILE.read_text().strip()
    if status != "SLURM_READY":
        pytest.skip(status)


def wait_for_job(job_id: str, deadline_s: int = JOB_DEADLINE_S) -> dict[str, str]:
    """Poll `scontrol show job` until the job reaches a final state; cancel it if it overruns the deadline."""
    deadline = time.monotonic() + deadline_s
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        assert shown.returncode == 0, f"scontrol show job {job_id}: {shown.stderr.strip()}"
        fields = dict(re.findall(r"(\w+)=(\S*)", shown.stdout))
        if fields.get("JobState") in TERMINAL_STATES:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} still {fields.get('JobState')} after {deadline_s}s (reason {fields.get('Reason')})")


def run_two_task_job(run_dir: Path, config: str, args: list[str], deadline_s: int = JOB_DEADLINE_S) -> str:
    """Submit a 1-node job of 2 tasks x 2 CPU devices through `python -m automodel_jax.launch slurm`, wait for it,
    check that it COMPLETED with exit code 0, and return its log."""
    command = [sys.executable, "-m", "automodel_jax.launch", "slurm", "--config", config, "--nodes", "1",
               "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpu-devices-per-task", "2", "--time", "10",
               "--job-name", "automodel-jax-test", "--run-dir", str(run_dir), *args]
    submitted = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"Submitted Slurm job (\d+)", submitted.stdout).group(1)

    fields = wait_for_job(job_id, deadline_s)
    log_file = run_dir / f"slurm-{job_id}.out"
    log = log_file.read_text() if log_file.is_file() else "(no log)"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log[-4000:]
    return log


def test_two_task_cpu_job_joins_and_computes_psum(tmp_path):
    require_slurm()
    run_dir = tmp_path / "run"
    log = run_two_task_job(run_dir, PSUM_CONFIG, PSUM_PROGRAM)

    values = range(4 * 2)  # 2 tasks x 2 CPU devices, psum_config's 2 rows per device
    for rank in range(2):
        result = json.loads((run_dir / f"rank{rank}.json").read_text())
        assert (result["process_index"], result["process_count"], result["source"]) == (rank, 2, "slurm")
        assert result["global_devices"] == 4 and result["local_devices"] == 2
        assert result["psum"] == float(sum(values))
        assert result["gathered"] == [2.0 * v for v in values]
        assert f"{rank}: rank {rank}/2 psum" in log
    assert "coordinator " in log and f"#SBATCH --chdir={REPO}" in (run_dir / "sbatch.sh").read_text()


@pytest.mark.slow
def test_two_task_job_runs_the_finetuning_cli_like_one_process(tmp_path):
    """The launcher's sbatch script runs `python -m automodel_jax.finetune` on both tasks (fsdp=4 over 2 x 2 CPU
    devices); the reference is one local process with 4 devices, run meanwhile."""
    require_slurm()
    build_embedded_assets()
    reference_dir, run_dir = tmp_path / "single", tmp_path / "slurm"
    reference = start(finetune_command(reference_dir), one_process_four_devices())
    try:
        log = run_two_task_job(run_dir, FINETUNE_CONFIG, [*FINETUNE_OVERRIDES, "--config.checkpoint.every_steps=2"],
                               FINETUNE_DEADLINE_S)
    finally:
        reference_output = finish([reference])[0]
    assert reference.returncode == 0, reference_output[-3000:]
    for rank in range(2):
        assert f"{rank}: [topology] process {rank}/2 " in log and "devices per process [2, 2]" in log
    assert f" -m automodel_jax.finetune --config {FINETUNE_CONFIG} " in (run_dir / "sbatch.sh").read_text()
    assert_same_training(run_dir, reference_dir)
    assert "0: validation loss:" in log and "1: validation loss:" not in log
    # Both ranks wrote their shards of the step-2 and final (step-3) checkpoints, complete (not *-tmp).
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["2", "3"], log[-3000:]
    assert {p.name for p in (checkpoints / "3").iterdir()} >= {"params", "train", "data", "meta"}
