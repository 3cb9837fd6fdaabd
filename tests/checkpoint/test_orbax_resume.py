"""Exact resume through the real CLI: a run killed with SIGKILL in the middle of an asynchronous save resumes from the
previous complete checkpoint and ends with the same losses at every step and bit-identical parameters as a run that
was never interrupted (CPU, embedded default, a few steps)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from automodel_jax.checkpoint.safetensors_io import SafetensorsFile

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "automodel_jax.finetune", "--config", str(REPO / "configs" / "llama_lora.py"),
            f"--config.run_dir={run_dir}", f"--config.train.max_steps={STEPS}",
            "--config.optim.schedule.warmup_steps=2", "--config.train.sample_prompts=()", "--config.train.log_every=1",
            "--config.train.val_max_samples=32", "--config.logging.tensorboard=false",
            "--config.checkpoint.every_steps=1"]


def env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", HF_HUB_OFFLINE="1")


def run_to_end(run_dir: Path) -> str:
    done = subprocess.run(command(run_dir), cwd=run_dir.parent, env=env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def in_flight_save(checkpoints: Path, min_step: int) -> Path | None:
    for entry in checkpoints.glob(f"*{TMP_SUFFIX}*") if checkpoints.is_dir() else ():
        if int(entry.name.split(".")[0]) >= min_step:
            return entry
    return None


def kill_during_save(proc: subprocess.Popen, checkpoints: Path, min_step: int) -> Path:
    """SIGKILL `proc` while Orbax is writing a checkpoint of step >= min_step: once its temporary directory shows,
    freeze the process (SIGSTOP), and kill it if the directory is still unfinished, else let it go on and wait for the
    next save."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        tmp = in_flight_save(checkpoints, min_step)
        if tmp is not None:
            os.kill(proc.pid, signal.SIGSTOP)
            if tmp.exists():
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return tmp
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.0005)
    proc.kill()
    pytest.fail(f"the run ended before a save of step >= {min_step} could be interrupted: {proc.communicate()}")


def train_losses(run_dir: Path) -> dict[int, dict]:
    """The record of every train step and validation, without the timings (a resumed run keeps one row per step and
    split: the rows of the steps it redoes are its own)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for timing in ("tokens_per_sec", "label_tokens_per_sec", "tokens_per_sec_per_device", "step_time", "mfu",
                       "peak_memory_gib"):
            record.pop(timing, None)
        key = (record.pop("split"), record.pop("step"))
        assert key not in records, f"two rows for {key}"
        records[key] = record
    return records


def adapter_tensors(run_dir: Path) -> dict[str, np.ndarray]:
    file = SafetensorsFile(run_dir / "export" / "adapter_model.safetensors")
    return {name: np.asarray(file.get(name)) for name in file.keys()}


@pytest.mark.slow
def test_sigkill_during_an_async_save_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(straight)

    proc = subprocess.Popen(command(killed), cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    interrupted = kill_during_save(proc, killed / "checkpoints", min_step=3)
    complete = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    interrupted_step = int(interrupted.name.split(".")[0])
    assert complete and max(complete) < interrupted_step and interrupted.is_dir()
    assert not (killed / "export").exists()

    out = run_to_end(killed)
    assert f"resumed from checkpoint {killed / 'checkpoints' / str(max(complete))} (step {max(complete)})" in out
    assert not list((killed / "checkpoints").glob(f"*{TMP_SUFFIX}*")), "the interrupted save was not cleaned up"
    assert sorted(int(p.name) for p in (killed / "checkpoints").iterdir()) == [STEPS - 1, STEPS]

    expected, resumed = train_losses(straight), train_losses(killed)
    assert sorted(k for k in expected if k[0] == "train") == [("train", s) for s in range(1, STEPS + 1)]
    for key in expected:
        assert resumed[key] == expected[key], key
    want, got = adapter_tensors(straight), adapter_tensors(killed)
    assert want.keys() == got.keys() and len(want) == 2 * 7 * 4  # A and B of 7 projections in 4 layers
    for name in want:
        assert want[name].tobytes() == got[name].tobytes(), name
