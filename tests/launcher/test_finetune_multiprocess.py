"""The real fine-tuning CLI across processes on localhost (no Slurm): two processes x 2 CPU devices with gloo
collectives train exactly like one process with 4 devices; bad meshes and an unreachable coordinator fail early with
one line."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .test_distributed import clean_env, free_port

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/llama_lora.py"
# A few steps of the embedded default on an fsdp=4 mesh: 8 rows a step in micro-batches of 1 per data rank (2
# accumulation steps), 8 validation samples, no sample generations.
OVERRIDES = ("--config.mesh.fsdp=4", "--config.train.max_steps=3", "--config.train.global_batch_size=8",
             "--config.train.micro_batch_size=1", "--config.train.log_every=1", "--config.train.val_max_samples=8",
             "--config.train.sample_prompts=()", "--config.optim.schedule.warmup_steps=1",
             "--config.logging.tensorboard=false")
TOLERANCE = 1e-5


def build_embedded_assets() -> None:
    """Build the embedded model and data here first, so that the concurrent processes only read them."""
    from automodel_jax.recipes.llm.finetune import resolve_path
    for name in ("embedded:tiny-llama", "embedded:word-tasks/train", "embedded:word-tasks/validation"):
        resolve_path(name)


@pytest.fixture(scope="module", autouse=True)
def embedded_assets():
    build_embedded_assets()


def finetune_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "automodel_jax.finetune", "--config", CONFIG, f"--config.run_dir={run_dir}",
            *OVERRIDES, *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run_dir: Path, reference_dir: Path) -> None:
    """Same records (split, step) in the same order, losses and gradient norms equal within TOLERANCE."""
    ours, reference = metrics(run_dir), metrics(reference_dir)
    assert [(r["split"], r["step"]) for r in ours] == [(r["split"], r["step"]) for r in reference]
    assert [r["step"] for r in ours if r["split"] == "train"] == [1, 2, 3]
    for mine, theirs in zip(ours, reference):
        for key in ("loss", "grad_norm"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=TOLERANCE, abs=TOLERANCE), (mine, theirs)


def assert_quiet_end(output: str) -> None:
    """No error text from the coordination service, Orbax or Python at the end of a run."""
    for noise in ("CANCELLED", "Traceback", " ERROR ", "E0000", "F0000"):
        assert noise not in output, output[-3000:]


def start(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: int = 400) -> list[str]:
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    return outputs


def one_process_four_devices() -> dict:
    env = clean_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    return env


def two_process_envs() -> list[dict]:
    address = f"127.0.0.1:{free_port()}"
    return [clean_env(COORDINATOR_ADDRESS=address, NUM_PROCESSES="2", PROCESS_ID=str(i)) for i in range(2)]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    procs = [start(finetune_command(single_dir), one_process_four_devices())]
    procs += [start(finetune_command(multi_dir), env) for env in two_process_envs()]
    outputs = finish(procs)
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    single, rank0, rank1 = outputs
    for rank, output in enumerate((rank0, rank1)):
        assert f"[topology] process {rank}/2 " in output and "devices per process [2, 2]" in output
        assert "mesh data=1 x fsdp=4 x tensor=1 x context=1" in output
        assert_quiet_end(output)
    assert_same_training(multi_dir, single_dir)
    # Only process 0 writes: one copy of each record (both processes share the run dir here) and one summary line.
    assert len(metrics(multi_dir)) == len(metrics(single_dir))
    assert "validation loss:" in rank0 and "validation loss:" not in rank1
    assert (multi_dir / "loss.png").is_file() and (multi_dir / "config.json").is_file()


def test_mesh_that_does_not_fit_the_model_fails_before_compiling(tmp_path):
    """The embedded model has 2 key/value heads: tensor=4 cannot split them."""
    result = subprocess.run(finetune_command(tmp_path / "run", "--config.mesh.fsdp=1", "--config.mesh.tensor=4"),
                            cwd=REPO, env=one_process_four_devices(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: num_key_value_heads 2 is not divisible by mesh tensor = 4; choose mesh sizes that divide it (or "
        "change num_key_value_heads)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_model_parallel_group_spanning_processes_is_refused(tmp_path):
    """tensor=2 x context=2 needs 4 devices per model replica, but each process has 2: both would feed the same rows."""
    procs = [start(finetune_command(tmp_path / "run", "--config.mesh.fsdp=1", "--config.mesh.tensor=2",
                                    "--config.mesh.context=2"), env) for env in two_process_envs()]
    outputs = finish(procs, timeout=120)
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 2, output[-3000:]
        assert ("error: processes [0, 1] would hold the same batch rows: the model-parallel axes (tensor x context "
                "= 4 devices) must fit within one process's 2 devices; make tensor x context divide it") in output


def test_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = clean_env(COORDINATOR_ADDRESS=address, NUM_PROCESSES="2", PROCESS_ID="1")
    began = time.monotonic()
    result = subprocess.run(finetune_command(tmp_path / "run", "--config.distributed.timeout_s=2"), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: process 1/2: JAX coordinator {address} unreachable after 2s (is process 0 running there, and the "
        "port open?)")
    assert "Traceback" not in result.stderr
    assert time.monotonic() - began < 60


@pytest.mark.slow
def test_a_failing_process_stops_the_other_at_once_naming_it(tmp_path):
    """Process 1 refuses its config once its model and data are loaded (a run by epochs learns its length from its
    data, so its warmup is checked then), while process 0 goes on into collectives that need process 1: process 0
    stops within seconds (not JAX's 100 s heartbeat timeout) with a line naming it."""
    error = ("optim.schedule.warmup_steps must be in [0, total_steps=500), got 100000; lower "
             "optim.schedule.warmup_steps or train longer (train.max_steps, train.num_epochs)")
    envs = two_process_envs()
    procs = [start(finetune_command(tmp_path / "run"), envs[0]),
             start(finetune_command(tmp_path / "run", "--config.train.max_steps=None",
                                    "--config.optim.schedule.warmup_steps=100000"), envs[1])]
    procs[1].wait(timeout=400)
    failed_at = time.monotonic()
    procs[0].wait(timeout=400)
    assert time.monotonic() - failed_at < 60  # JAX's own heartbeat timeout would take 100 s
    rank0, rank1 = finish(procs)
    assert procs[1].returncode == 2 and f"error: {error}" in rank1.splitlines(), rank1[-3000:]
    assert procs[0].returncode == 1, rank0[-3000:]
    # the line naming the failed process; the coordination service may add its own CANCELLED text after it when the
    # failed process leaves first (a failure, not a normal end: only a normal end must be free of error text)
    assert f"error: process 1/2 failed: {error}; process 0/2 stops too" in rank0.splitlines(), rank0[-3000:]
    # the failed process ends with its one line; the other may still print the torn-down service's traceback after its
    # own line (known issue, issue 13 point 8: to be made quiet)
    assert "Traceback" not in rank1, rank1[-3000:]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step_with_one_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    command = finetune_command(run_dir, "--config.train.max_steps=100000", "--config.checkpoint.every_steps=0")
    procs = [start(command, env) for env in two_process_envs()]
    deadline = time.monotonic() + 400
    while not (run_dir / "metrics.jsonl").exists() or not [r for r in metrics(run_dir) if r["split"] == "train"]:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    rank0, rank1 = finish(procs)
    assert [p.returncode for p in procs] == [143, 143], (rank0[-3000:], rank1[-3000:])
    [stopped] = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir())
    assert [r["step"] for r in metrics(run_dir) if r["split"] == "train"][-1] == stopped
    saved = f"stopped after step {stopped}, checkpoint {run_dir / 'checkpoints' / str(stopped)} saved; resume with: "
    assert rank1.strip().splitlines()[-1].startswith(f"interrupted by SIGTERM: {saved}")
    assert rank0.strip().splitlines()[-1].startswith(
        f"interrupted by a signal to another process (SIGTERM assumed): {saved}")
    for output in (rank0, rank1):
        assert_quiet_end(output)
