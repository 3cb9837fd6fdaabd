"""`automodel-jax COMMAND ...`: the help lists every command, each command gets its arguments untouched (shown by
each module's own error for a missing file), and a missing or unknown command is a one-line error with exit code 2.
Every entry point answers --help; finetune's lists the config files and presets, and --print-config shows every key
without loading anything. Library chatter (transformers' PyTorch advice, Hub retries) stays out of the output."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time

import pytest

from automodel_jax import cli
from reference import REPO, STORIES


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "automodel_jax.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_help_lists_every_command():
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")]
    assert listed == ["finetune", "export", "generate", "evaluate", "launch", "plan"]


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
    (["plan", "--config", "missing.py"], "config file 'missing.py' not found"),
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
    (["train"], "unknown command 'train'; commands: finetune, export, generate, evaluate, launch, plan"),
    ([], "missing command; give one of: finetune, export, generate, evaluate, launch, plan"),
    (["--config", "configs/llama_lora.py"], "unknown option '--config'"),
])
def test_missing_or_unknown_command_is_one_error_line(argv, message, capsys):
    assert cli.main(argv) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert message in line


MODULES = ("finetune", "export", "generate", "evaluate", "launch", "plan")


@pytest.mark.parametrize("command", [[f"automodel_jax.{name}", "--help"] for name in MODULES]
                         + [["automodel_jax.cli", "finetune", "--help"], ["automodel_jax.launch", "slurm", "--help"]],
                         ids=[*MODULES, "console_script_finetune", "launch_slurm"])
def test_every_entry_point_answers_help_in_a_real_process(command):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and done.stderr == "", done.stderr


def test_finetune_help_lists_every_config_file_with_its_presets(capsys):
    """Each configs/*.py with the presets its PRESETS declares (read here by running the file), and --print-config."""
    from automodel_jax.cli import finetune
    from automodel_jax.config import load_config_file
    assert finetune.main(["--help"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  configs/")}
    files = sorted((REPO / "configs").glob("*.py"))
    assert sorted(listed) == [f"configs/{f.name}" for f in files] and len(files) >= 10
    for path in files:
        spec = importlib.util.spec_from_file_location(f"_help_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for preset in module.PRESETS:
            assert repr(preset) in listed[f"configs/{path.name}"]
            load_config_file(f"{path}:{preset}")  # every preset listed is one that loads


def test_print_config_prints_every_key_with_type_and_value_and_loads_nothing(tmp_path):
    """Overrides applied (the minimum learning rate follows a new learning rate), keys as the config has them; the
    model path does not exist and no run directory is made: nothing is loaded or written."""
    from automodel_jax.config import parse_config
    argv = ["--config", str(REPO / "configs" / "llama_lora.py"), "--config.optim.learning_rate=1e-4",
            f"--config.run_dir={tmp_path / 'run'}", "--config.model.path=/nonexistent/model"]
    done = run_cli("finetune", *argv, "--print-config")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    keys = [line.split(":")[0] for line in lines]
    flat = lambda tree, prefix="": [k for name, v in tree.items()  # noqa: E731
                                    for k in (flat(v, f"{prefix}{name}.") if isinstance(v, dict) and v
                                              else [prefix + name])]
    assert sorted(keys) == sorted(flat(parse_config(argv).to_dict()))
    for line in ("optim.learning_rate: float = 0.0001", "optim.schedule.min_learning_rate: float = 1e-05",
                 "model.path: str = '/nonexistent/model'", "train.max_steps: int = 400",
                 "checkpoint.restore_from: str or None = None", "peft.target_modules: tuple = ('*_proj',)"):
        assert line in lines
    assert not (tmp_path / "run").exists()


def test_print_config_with_a_misspelt_key_is_one_error_line():
    done = run_cli("finetune", "--config", str(REPO / "configs" / "llama_lora.py"), "--config.optim.learning_rat=1",
                   "--print-config")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == ("error: unknown config key 'optim.learning_rat'; did you mean "
                                                    "'optim.learning_rate'?")


def test_transformers_pytorch_advice_is_silenced_in_our_commands():
    """Without torch, transformers advises "PyTorch was not found" at import (the control shows it); our commands,
    which never use transformers' models, do not print it."""
    hide_torch = "import sys; sys.modules['torch'] = None; "
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}  # transformers' defaults
    control = subprocess.run([sys.executable, "-c", hide_torch + "import transformers"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert "PyTorch was not found" in control.stderr
    ours = subprocess.run([sys.executable, "-c", hide_torch + "from automodel_jax.cli import main; "
                           "sys.exit(main(['finetune', '--help']))"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert ours.returncode == 0 and ours.stderr == "", ours.stderr


@pytest.mark.parametrize(("env", "cause"), [
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "the Hub (http://127.0.0.1:9) cannot be reached"),
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set and it is not in the datasets cache"),
], ids=["no_network", "offline"])
def test_evaluate_without_data_and_without_the_hub_is_one_error_line_at_once(tmp_path, env, cause):
    """No --data and no Hub: one line naming the dataset, the cause and --data, within seconds (no retries)."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "automodel_jax.evaluate", "--model", str(STORIES), "--task",
                           "hellaswag"], capture_output=True, text=True, timeout=120,
                          env=dict(base, JAX_PLATFORMS="cpu", HF_DATASETS_CACHE=str(tmp_path / "datasets"), **env))
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: Rowan/hellaswag is a Hub dataset") and cause in line and "--data" in line, line
    assert time.monotonic() - started < 60
