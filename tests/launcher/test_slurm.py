"""The sbatch script: its content, what it does when bash runs it, and submission through sbatch.

Slurm's own tools (srun, scontrol, sbatch) are replaced by small scripts on PATH that record what they were given;
the script itself runs in a real bash. test_slurm_real.py covers a real Slurm.
"""

import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from automodel_jax.launcher.cluster import derive_port
from automodel_jax.launcher.slurm import LaunchConfigError, SlurmError, SlurmJob, render_sbatch_script, submit

TRICKY_OVERRIDE = """--config.name=it's a "test" $HOME"""


def make_job(tmp_path: Path, **fields) -> SlurmJob:
    base = SlurmJob(config="configs/llama_lora.py:tiny", overrides=("--config.lr=0.001", TRICKY_OVERRIDE),
                    run_dir=tmp_path / "run", workdir=tmp_path, python="/opt/py/bin/python", nodes=2,
                    gpus_per_node=8, tasks_per_node=1, partition="batch", time="04:00:00")
    return replace(base, **fields)


def write_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


RECORD_ARGS_AND_ENV = (
    f"exec {sys.executable} -c 'import json, os, sys; print(json.dumps({{\"argv\": sys.argv[1:], "
    f"\"env\": {{k: os.environ.get(k) for k in (\"COORDINATOR_ADDRESS\", \"COORDINATOR_PORT\", \"JAX_PLATFORMS\", "
    f"\"XLA_FLAGS\")}}}}))' \"$@\""
)


def run_script(tmp_path: Path, job: SlurmJob, **env: str) -> dict:
    """Run the rendered script in bash as Slurm would, with srun and scontrol recording what reached them."""
    bin_dir = tmp_path / "bin"
    write_tool(bin_dir, "srun", RECORD_ARGS_AND_ENV)
    write_tool(bin_dir, "scontrol", '[ "$1 $2 $3" = "show hostnames node[07-08]" ] && printf "node07\\nnode08\\n"')
    script = tmp_path / "job.sh"
    script.write_text(render_sbatch_script(job))
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node[07-08]",
                "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", **env}
    result = subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_gpu_script_directives(tmp_path):
    script = render_sbatch_script(make_job(tmp_path, container_image="nvcr.io/nvidia/jax:25.04",
                                           container_mounts="/data:/data"))
    lines = script.splitlines()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=batch",
                      "--time=04:00:00", f"--output={tmp_path}/run/slurm-%j.out", f"--chdir={tmp_path}"):
        assert f"#SBATCH {directive}" in lines
    assert "JAX_PLATFORMS" not in script and "xla_force_host_platform_device_count" not in script
    assert "--container-image=nvcr.io/nvidia/jax:25.04" in script and "--container-mounts=/data:/data" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_script_runs_program_on_first_host_with_exact_arguments(tmp_path):
    job = make_job(tmp_path)
    recorded = run_script(tmp_path, job)
    assert recorded["argv"] == [
        "--kill-on-bad-exit=1", "--label", "/opt/py/bin/python", "-m", "automodel_jax.finetune",
        "--config", "configs/llama_lora.py:tiny", f"--config.run_dir={tmp_path / 'run'}", "--config.lr=0.001",
        TRICKY_OVERRIDE,
    ]
    assert recorded["env"]["COORDINATOR_ADDRESS"] == f"node07:{derive_port(1234)}"
    assert recorded["env"]["JAX_PLATFORMS"] is None


def test_script_keeps_a_coordinator_port_from_the_submitter(tmp_path):
    recorded = run_script(tmp_path, make_job(tmp_path), COORDINATOR_PORT="31000")
    assert recorded["env"]["COORDINATOR_ADDRESS"] == "node07:31000"


def test_cpu_script_sets_host_devices_and_program(tmp_path):
    job = make_job(tmp_path, gpus_per_node=0, tasks_per_node=2, cpu_devices_per_task=4, program="tests/prog.py",
                   partition=None, time=None)
    script = render_sbatch_script(job)
    assert "--gpus" not in script and "#SBATCH --partition" not in script and "#SBATCH --time" not in script
    recorded = run_script(tmp_path, job, XLA_FLAGS="--xla_dump_to=/tmp/x")
    assert recorded["env"]["JAX_PLATFORMS"] == "cpu"
    assert recorded["env"]["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
    assert recorded["argv"][2:4] == ["/opt/py/bin/python", "tests/prog.py"]


@pytest.mark.parametrize(
    "fields, complaint",
    [
        ({"nodes": 0}, "--nodes 0: need at least 1 node"),
        ({"gpus_per_node": -1}, "--gpus-per-node -1: must be >= 0"),
        ({"tasks_per_node": 0}, "--tasks-per-node 0"),
        ({"gpus_per_node": 8, "tasks_per_node": 3}, "--gpus-per-node 8 is not divisible by --tasks-per-node 3"),
        ({"cpu_devices_per_task": 2}, "--cpu-devices-per-task only applies with --gpus-per-node 0"),
        ({"gpus_per_node": 0, "cpu_devices_per_task": 0}, "--cpu-devices-per-task 0: must be >= 1"),
        ({"time": "4 hours"}, "--time '4 hours': use Slurm's format"),
        ({"partition": "a b"}, "--partition 'a b'"),
        ({"job_name": ""}, "--job-name ''"),
        ({"run_dir": Path("/tmp/has space")}, "--run-dir '/tmp/has space'"),
        ({"module": ""}, "--module is empty"),
    ],
)
def test_bad_job_options(tmp_path, fields, complaint):
    with pytest.raises(LaunchConfigError, match=complaint.replace("(", r"\(")):
        make_job(tmp_path, **fields)


def test_accepted_time_formats(tmp_path):
    for value in ("30", "30:00", "04:00:00", "1-12", "1-12:00", "2-00:00:00", "UNLIMITED"):
        assert make_job(tmp_path, time=value).time == value


def test_submit_writes_script_and_returns_job_id(tmp_path, monkeypatch):
    write_tool(tmp_path / "bin", "sbatch", f'echo "$@" > {tmp_path}/sbatch_args; echo "42;cluster"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    job = make_job(tmp_path)
    assert submit(job) == "42"
    assert job.script_path.read_text() == render_sbatch_script(job)
    assert os.access(job.script_path, os.X_OK)
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", str(job.script_path)]
    assert job.log_path("42") == tmp_path / "run" / "slurm-42.out"


def test_submit_reports_sbatch_refusal(tmp_path, monkeypatch):
    write_tool(tmp_path / "bin", "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(SlurmError, match="sbatch rejected .*: sbatch: error: invalid partition specified: nope"):
        submit(make_job(tmp_path))


def test_submit_without_sbatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SlurmError, match="sbatch not found on PATH"):
        submit(make_job(tmp_path))
