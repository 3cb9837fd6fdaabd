"""How the real finetune CLI ends. A handled error is its one `error:` line with nothing after it (no Orbax or thread
traceback at exit: checkpoint managers close first), every time. SIGTERM (train.preemption_signal) or Ctrl-C (SIGINT)
during training finishes the step, saves a checkpoint of it, prints one line with the command that resumes, and exits
128 + the signal; that command resumes from the saved step. A signal before training is one line as well."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from automodel_jax.training.interrupt import resolve_signal
from automodel_jax.config import ConfigError
from reference import ASSETS, REPO, STORIES

HELLASWAG = ASSETS / "data" / "hellaswag" / "validation.jsonl"
ENV = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hellaswag") / "rows.jsonl"
    path.write_text("".join(HELLASWAG.read_text(encoding="utf-8").splitlines(keepends=True)[:64]), encoding="utf-8")
    return path


def finetune_args(run_dir: Path, rows: Path, *overrides: str) -> list[str]:
    """A float32 LoRA run of stories260K that outlasts any test (it is stopped by a signal); the only checkpoint it
    writes by itself is the final one."""
    return ["--config", str(REPO / "configs" / "llama_lora.py"), f"--config.run_dir={run_dir}",
            f"--config.model.path={STORIES}", "--config.model.dtype=float32",
            "--config.data.train.kind=hellaswag", f"--config.data.train.path={rows}",
            "--config.data.validation.kind=hellaswag", f"--config.data.validation.path={rows}",
            "--config.data.seq_len=64", "--config.train.max_steps=100000", "--config.train.global_batch_size=4",
            "--config.train.micro_batch_size=4", "--config.train.sample_prompts=()", "--config.train.val_every=0",
            "--config.train.log_every=1", "--config.train.val_max_samples=4", "--config.logging.tensorboard=false",
            "--config.optim.schedule.warmup_steps=0", "--config.checkpoint.every_steps=0", *overrides]


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [row["step"] for row in map(json.loads, lines) if row["split"] == "train"]


def signal_after_step(proc: subprocess.Popen, run_dir: Path, step: int, signum: int) -> tuple[str, str]:
    """Send `signum` once metrics.jsonl shows `step` trained; the process's (stdout, stderr)."""
    deadline = time.monotonic() + 300
    while not [s for s in train_steps(run_dir) if s >= step]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signum)
    return proc.communicate(timeout=120)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_then_ctrl_c_save_the_step_reached_and_the_printed_command_resumes(rows, tmp_path):
    run_dir = tmp_path / "run"
    args = finetune_args(run_dir, rows)
    proc = start([sys.executable, "-m", "automodel_jax.finetune", *args], tmp_path)
    out, err = signal_after_step(proc, run_dir, 2, signal.SIGTERM)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    [stopped] = checkpoint_steps(run_dir)
    assert train_steps(run_dir)[-1] == stopped >= 2  # the checkpoint holds the last step trained and logged
    resume = f"python -m automodel_jax.finetune {shlex.join(args)}"
    assert err.strip().splitlines()[-1] == (f"interrupted by SIGTERM: stopped after step {stopped}, checkpoint "
                                            f"{run_dir / 'checkpoints' / str(stopped)} saved; resume with: {resume}")

    # The printed command resumes from that step; Ctrl-C then stops it the same way (exit 130).
    command = shlex.split(resume)
    proc = start([sys.executable, *command[1:]], tmp_path)
    out, err = signal_after_step(proc, run_dir, stopped + 2, signal.SIGINT)
    assert proc.returncode == 130, err[-3000:]
    assert f"resumed from checkpoint {run_dir / 'checkpoints' / str(stopped)} (step {stopped})" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    steps = train_steps(run_dir)
    again = checkpoint_steps(run_dir)[-1]
    assert steps == list(range(1, stopped + 1)) + list(range(stopped + 1, again + 1))  # each step once, in order
    assert err.strip().splitlines()[-1].startswith(f"interrupted by SIGINT: stopped after step {again}, checkpoint "
                                                   f"{run_dir / 'checkpoints' / str(again)} saved; resume with: ")


def test_a_signal_before_training_is_one_line(rows, tmp_path):
    proc = start([sys.executable, "-m", "automodel_jax.finetune", *finetune_args(tmp_path / "run", rows)], tmp_path)
    for line in proc.stdout:  # the first line: the topology, before the model is loaded
        if line.startswith("[topology]"):
            break
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "interrupted by SIGTERM outside the train loop (no step in progress); resume with: python -m "
        "automodel_jax.finetune --config ")


@pytest.mark.parametrize("overrides, message", [
    # A run by epochs learns its length from its data: its warmup is refused after the model and data loaded.
    (("--config.train.max_steps=None", "--config.optim.schedule.warmup_steps=100000"),
     "error: optim.schedule.warmup_steps must be in [0, total_steps=9), got 100000; lower "
     "optim.schedule.warmup_steps or train longer (train.max_steps, train.num_epochs)"),
    (("--config.train.preemption_signal=SIGFOO",),
     "error: train.preemption_signal='SIGFOO' is not a signal; give a name such as 'SIGTERM' or 'SIGUSR1'"),
])
def test_a_handled_error_is_the_last_line_every_time(rows, tmp_path, overrides, message):
    """The optimizer error of a run by epochs comes late, once the model and data are loaded (the checkpoint
    managers' background clean-up used to print an Orbax traceback at exit in most runs), so it is tried three
    times."""
    argv = [sys.executable, "-m", "automodel_jax.finetune", *finetune_args(tmp_path / "run", rows, *overrides)]
    for _ in range(3 if "warmup" in message else 1):
        done = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1] == message
        assert "Traceback" not in done.stderr and " ERROR " not in done.stderr


def test_a_refused_checkpoint_closes_its_manager_before_the_error(rows, tmp_path):
    """Resuming a run with another LoRA rank: the checkpoint is refused after its manager started."""
    run_dir = tmp_path / "run"
    args = finetune_args(run_dir, rows, "--config.train.max_steps=1", "--config.export.when=never")
    done = subprocess.run([sys.executable, "-m", "automodel_jax.finetune", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and checkpoint_steps(run_dir) == [1], done.stderr[-3000:]
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "automodel_jax.finetune", *args, "--config.peft.r=4"],
                              cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: checkpoint ") and "but the config says r=4 (peft.r)" in last, last
        assert "Traceback" not in done.stderr and " ERROR " not in done.stderr


@pytest.mark.parametrize("name, expected", [("SIGTERM", signal.SIGTERM), ("term", signal.SIGTERM),
                                            ("SIGUSR1", signal.SIGUSR1), ("usr2", signal.SIGUSR2), ("15", 15),
                                            (2, signal.SIGINT)])
def test_preemption_signal_names(name, expected):
    assert resolve_signal(name) == expected


@pytest.mark.parametrize("name, complaint", [("SIGFOO", "is not a signal"), ("", "is not a signal"),
                                              ("999", "is not a signal"), ("kill", "SIGKILL cannot be handled"),
                                              ("19", "SIGSTOP cannot be handled")])
def test_a_bad_preemption_signal_is_a_config_error(name, complaint):
    with pytest.raises(ConfigError, match=f"train.preemption_signal=.*{complaint}"):
        resolve_signal(name)
