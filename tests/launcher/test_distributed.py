"""initialize_distributed for real: two local processes with gloo collectives, and coordinator time-outs."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from automodel_jax.launcher.cluster import ClusterConfigError
from automodel_jax.launcher.distributed import describe_topology, initialize_distributed

REPO = Path(__file__).resolve().parents[2]
ROWS_PER_DEVICE = 2  # psum_config.py's default
CLUSTER_VARS = ("COORDINATOR_ADDRESS", "COORDINATOR_PORT", "NUM_PROCESSES", "PROCESS_ID", "LOCAL_DEVICE_IDS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any cluster variables (CI may itself run inside Slurm), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS and not k.startswith("SLURM_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", **extra)
    return env


def expected_values(global_devices: int) -> tuple[float, list[float]]:
    values = range(global_devices * ROWS_PER_DEVICE)
    return float(sum(values)), [2.0 * v for v in values]


def run_psum_processes(envs: list[dict[str, str]], run_dir: Path) -> list[dict]:
    command = [sys.executable, "-m", "tests.launcher.psum_program", "--config", "tests/launcher/psum_config.py",
               f"--config.run_dir={run_dir}"]
    procs = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for env in envs]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output
    return [json.loads((run_dir / f"rank{i}.json").read_text()) for i in range(len(envs))]


def check_two_process_results(results: list[dict], source: str) -> None:
    psum, gathered = expected_values(global_devices=4)
    for index, result in enumerate(results):
        assert result["process_index"] == index and result["process_count"] == 2 and result["source"] == source
        assert result["local_devices"] == 2 and result["global_devices"] == 4
        assert result["psum"] == psum
        assert result["gathered"] == gathered
        assert f"process {index}/2" in result["topology"] and "devices per process [2, 2]" in result["topology"]
        assert "mesh data=4" in result["topology"]


def test_two_processes_explicit_env(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    envs = [clean_env(COORDINATOR_ADDRESS=address, NUM_PROCESSES="2", PROCESS_ID=str(i)) for i in range(2)]
    check_two_process_results(run_psum_processes(envs, tmp_path), source="env")


def test_two_processes_slurm_style_env(tmp_path):
    """The Slurm detection path end to end, with the variables an srun step on this host would set."""
    step = dict(SLURM_JOB_ID="77", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="localhost",
                SLURM_STEP_TASKS_PER_NODE="2", SLURM_NODEID="0", COORDINATOR_PORT=str(free_port()))
    envs = [clean_env(**step, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)) for i in range(2)]
    check_two_process_results(run_psum_processes(envs, tmp_path), source="slurm")


@pytest.mark.parametrize(
    "process_id, complaint",
    [
        ("1", "process 1/2: JAX coordinator {address} unreachable after 2s"),
        ("0", "process 0/2: not all 2 processes joined JAX coordinator {address} within 2s"),
    ],
)
def test_coordinator_timeout_fails_with_one_clear_line(process_id, complaint):
    """Process 1 finds nothing listening; process 0 waits for a peer that never comes."""
    address = f"127.0.0.1:{free_port()}"
    env = clean_env(COORDINATOR_ADDRESS=address, NUM_PROCESSES="2", PROCESS_ID=process_id)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "automodel_jax.launcher", "--timeout-s", "2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"DistributedInitError: {complaint.format(address=address)}"), result.stderr
    assert elapsed < 2 + 20, f"took {elapsed:.1f}s for a 2s timeout"
    assert "Check failure" not in result.stderr


def test_coordinator_port_in_use():
    """JAX itself crashes when process 0 cannot bind the coordinator port; we stop first with one line."""
    with socket.socket() as squatter:
        squatter.bind(("0.0.0.0", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = clean_env(COORDINATOR_ADDRESS=f"127.0.0.1:{port}", NUM_PROCESSES="2", PROCESS_ID="0")
        result = subprocess.run([sys.executable, "-m", "automodel_jax.launcher", "--timeout-s", "2"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"DistributedInitError: process 0/2: cannot listen on coordinator port {port} of 127.0.0.1:{port} "
        "(Address already in use); choose another COORDINATOR_PORT"
    )


def test_single_process_is_a_no_op(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    info = initialize_distributed()
    assert (info.process_index, info.process_count, info.source) == (0, 1, "single")
    assert info.global_device_count == jax.device_count()
    assert not jax.distributed.is_initialized()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    line = describe_topology(mesh, echo=False)
    assert line.startswith("[topology] process 0/1 ")
    assert f"devices per process [{jax.device_count()}]" in line and f"mesh data={jax.device_count()}" in line


def test_bad_env_and_timeout_raise_before_touching_jax(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NUM_PROCESSES", "2")
    with pytest.raises(ClusterConfigError, match="set COORDINATOR_ADDRESS, PROCESS_ID too"):
        initialize_distributed()
    with pytest.raises(ValueError, match="timeout_s=0 must be at least 1 second"):
        initialize_distributed(timeout_s=0)
