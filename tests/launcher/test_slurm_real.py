"""A real 2-task CPU job on the local Slurm started by .ci/slurm_up.sh, submitted through our launcher CLI.

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

REPO = Path(__file__).resolve().parents[2]
STATUS_FILE = Path(os.environ.get("AUTOMODEL_JAX_SLURM_STATUS", "/tmp/automodel_jax_slurm_status"))
# What every task runs; to run the real recipe, swap for ["--module", "automodel_jax.finetune"] and its config.
PROGRAM = ["--module", "tests.launcher.psum_program"]
CONFIG = "tests/launcher/psum_config.py"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
JOB_DEADLINE_S = 180

pytestmark = pytest.mark.slurm


def require_slurm() -> None:
    if not STATUS_FILE.is_file():
        pytest.skip(f"SLURM_UNAVAILABLE: no {STATUS_FILE}; run .ci/slurm_up.sh as root first")
    status = STATUS_FILE.read_text().strip()
    if status != "SLURM_READY":
        pytest.skip(status)


def wait_for_job(job_id: str) -> dict[str, str]:
    """Poll `scontrol show job` until the job reaches a final state; cancel it if it overruns the deadline."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        assert shown.returncode == 0, f"scontrol show job {job_id}: {shown.stderr.strip()}"
        fields = dict(re.findall(r"(\w+)=(\S*)", shown.stdout))
        if fields.get("JobState") in TERMINAL_STATES:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job_id], check=False)
    pytest.fail(f"job {job_id} still {fields.get('JobState')} after {JOB_DEADLINE_S}s (reason {fields.get('Reason')})")


def test_two_task_cpu_job_joins_and_computes_psum(tmp_path):
    require_slurm()
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "automodel_jax.launch", "slurm", "--config", CONFIG, "--nodes", "1",
               "--gpus-per-node", "0", "--tasks-per-node", "2", "--cpu-devices-per-task", "2", "--time", "5",
               "--job-name", "automodel-jax-test", "--run-dir", str(run_dir), *PROGRAM]
    submitted = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"Submitted Slurm job (\d+)", submitted.stdout).group(1)

    fields = wait_for_job(job_id)
    log_file = run_dir / f"slurm-{job_id}.out"
    log = log_file.read_text() if log_file.is_file() else "(no log)"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log

    values = range(4 * 2)  # 2 tasks x 2 CPU devices, psum_config's 2 rows per device
    for rank in range(2):
        result = json.loads((run_dir / f"rank{rank}.json").read_text())
        assert (result["process_index"], result["process_count"], result["source"]) == (rank, 2, "slurm")
        assert result["global_devices"] == 4 and result["local_devices"] == 2
        assert result["psum"] == float(sum(values))
        assert result["gathered"] == [2.0 * v for v in values]
        assert f"{rank}: rank {rank}/2 psum" in log
    assert "coordinator " in log and f"#SBATCH --chdir={REPO}" in (run_dir / "sbatch.sh").read_text()
