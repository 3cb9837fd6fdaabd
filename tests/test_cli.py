"""`automodel-jax COMMAND ...`: the help lists every command, each command gets its arguments untouched (shown by
each module's own error for a missing file), and a missing or unknown command is a one-line error with exit code 2."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

from automodel_jax import cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "automodel_jax.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_help_lists_every_command():
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["finetune", "export", "generate", "evaluate", "launch"]


def test_the_console_script_is_this_main():
    [script] = importlib.metadata.entry_points(group="console_scripts", name="automodel-jax")
    assert script.load() is cli.main


def test_finetune_gets_its_arguments_in_a_real_process(tmp_path):
    done = run_cli("finetune", "--config", str(tmp_path / "nonexistent.py"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: config file '{tmp_path / 'nonexistent.py'}' not found"


@pytest.mark.parametrize(("argv", "message"), [
    (["finetune", "--config", "missing.py", "--config.seed=1"], "config file 'missing.py' not found"),
    (["export", "--checkpoint", "/nonexistent/run", "--out", "/nonexistent/out"], "checkpoint /nonexistent/run does"),
    (["generate", "--model", "/nonexistent/model", "--prompt", "Once"],
     "model path '/nonexistent/model' is not a checkpoint directory"),
    (["evaluate", "--model", "/nonexistent/model", "--task", "squad", "--data", "/nonexistent/rows.jsonl"],
     "/nonexistent/rows.jsonl does not exist"),
    (["launch", "slurm", "--config", "missing.py", "--nodes", "1", "--gpus-per-node", "0", "--dry-run"],
     "file missing.py not found"),
])
def test_each_command_runs_its_module_with_the_remaining_arguments(argv, message, capsys):
    assert cli.main(argv) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert message in line


def test_a_command_keeps_its_own_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    assert exit_info.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["fintune", "--config", "configs/llama_lora.py"], "unknown command 'fintune'; did you mean 'finetune'?"),
    (["train"], "unknown command 'train'; commands: finetune, export, generate, evaluate, launch"),
    ([], "missing command; give one of: finetune, export, generate, evaluate, launch"),
    (["--config", "configs/llama_lora.py"], "unknown option '--config'"),
])
def test_missing_or_unknown_command_is_one_error_line(argv, message, capsys):
    assert cli.main(argv) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert message in line
