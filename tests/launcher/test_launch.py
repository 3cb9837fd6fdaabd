"""`python -m automodel_jax.launch slurm`: dry runs, override pass-through, the fine-tuning config checked before
anything is written or submitted, and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from automodel_jax.cli.launch import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/llama_lora.py"  # the fine-tuning module's config (the default --module)
PSUM_CONFIG = "tests/launcher/psum_config.py"  # psum_program.py's


def cli(tmp_path: Path, *extra: str, config: str = CONFIG) -> list[str]:
    return ["slurm", "--config", str(REPO / config), "--nodes", "1", "--gpus-per-node", "0",
            "--run-dir", str(tmp_path / "run"), *extra]


def test_dry_run_subprocess_prints_script_and_writes_nothing(tmp_path):
    command = [sys.executable, "-m", "automodel_jax.launch", "slurm", "--config", f"{CONFIG}:llama3.2-1b",
               "--nodes", "2", "--gpus-per-node", "8", "--tasks-per-node", "8", "--partition", "batch", "--time",
               "01:00:00", "--container-image", "nvcr.io/nvidia/jax:25.04", "--run-dir", str(tmp_path / "run"),
               "--config.optim.learning_rate=0.01", "--config.peft.r=8", "--dry-run"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=batch", "#SBATCH --time=01:00:00", f"#SBATCH --chdir={REPO}"):
        assert line in script.splitlines()
    assert "--container-image=nvcr.io/nvidia/jax:25.04" in script
    assert (f"python3 -m automodel_jax.finetune --config {CONFIG}:llama3.2-1b --config.run_dir={tmp_path / 'run'} "
            "--config.optim.learning_rate=0.01 --config.peft.r=8") in script
    assert not (tmp_path / "run").exists()


def test_dry_run_cpu_job_with_module_override(tmp_path, capsys):
    code = main(cli(tmp_path, "--tasks-per-node", "2", "--cpu-devices-per-task", "2", "--module",
                    "tests.launcher.psum_program", "--dry-run", config=PSUM_CONFIG))
    script = capsys.readouterr().out
    assert code == 0
    assert "--gpus" not in script and "--xla_force_host_platform_device_count=2" in script
    assert f"{sys.executable} -m tests.launcher.psum_program --config {REPO / PSUM_CONFIG}" in script


def test_override_forms_are_normalised(tmp_path, capsys):
    extra = ["--config.optim.learning_rate", "0.01", "--config.data.packing", "--config.data.seq_len=64", "--dry-run"]
    assert main(cli(tmp_path, *extra)) == 0
    assert (f"--config.run_dir={tmp_path / 'run'} --config.optim.learning_rate=0.01 --config.data.packing "
            "--config.data.seq_len=64\n") in capsys.readouterr().out


def test_run_dir_from_config_override(tmp_path, capsys):
    extra = ["--config", str(REPO / CONFIG), "--nodes", "1", "--gpus-per-node", "0"]
    assert main(["slurm", *extra, f"--config.run_dir={tmp_path}/a", "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert f"#SBATCH --output={tmp_path}/a/slurm-%j.out" in script
    assert script.count("--config.run_dir=") == 1


def test_default_run_dir_is_under_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "--config", str(REPO / CONFIG), "--nodes", "1", "--gpus-per-node", "0",
                 "--job-name", "probe", "--dry-run"]) == 0
    assert f"--config.run_dir={tmp_path}/runs/probe-" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, complaint",
    [
        (["--tasks-per-node", "0"], "error: --tasks-per-node 0: need at least 1 task per node"),
        (["--lr", "3"], "error: unrecognised argument '--lr': config overrides look like --config.key=value"),
        (["stray"], "error: unrecognised argument 'stray'"),
        (["--config.run_dir"], "error: --config.run_dir needs a value"),
        (["--config.run_dir=/elsewhere"], "differ: give one of them"),
        (["--program", "no_such_program.py"], "error: --program no_such_program.py: file not found"),
    ],
)
def test_bad_options_fail_with_one_line(tmp_path, capsys, extra, complaint):
    assert main(cli(tmp_path, *extra, "--dry-run")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and complaint in err


@pytest.mark.parametrize(
    "spec, extra, complaint",
    [
        (f"{CONFIG}:llama3.2-2b", [], "unknown preset 'llama3.2-2b'"),
        (CONFIG, ["--config.optim.learning_rat=1e-4"], "unknown config key 'optim.learning_rat'; did you mean "
                                                       "'optim.learning_rate'?"),
        (CONFIG, ["--config.train.max_steps=many"], "config key 'train.max_steps' expects int or None, got 'many'"),
        (CONFIG, ["--config.peft.method=lorra"], "peft.method must be one of 'lora', 'none'"),
        (PSUM_CONFIG, [], "unknown config key 'peft.method'"),  # not a fine-tuning config at all
    ],
    ids=["preset", "misspelt_key", "value_type", "recipe_choice", "another_program_config"],
)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "submit"])
def test_a_bad_fine_tuning_config_is_refused_before_writing_or_submitting(tmp_path, capsys, monkeypatch, spec, extra,
                                                                          complaint, dry_run):
    """The same checks as `finetune`'s config loading, before the script is printed, written or submitted: one
    error line, exit 2, nothing in the run dir and sbatch never called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path / 'sbatch_was_called'}\necho 977\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    argv = ["slurm", "--config", str(REPO / spec), "--nodes", "1", "--gpus-per-node", "0", "--run-dir",
            str(tmp_path / "run"), *extra] + (["--dry-run"] if dry_run else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and complaint in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sbatch_was_called").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["slurm", "--config", "nope.py:tiny", "--nodes", "1", "--gpus-per-node", "0", "--dry-run"]) == 2
    assert "error: --config nope.py:tiny: file nope.py not found" in capsys.readouterr().err


def test_non_integer_nodes_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["slurm", "--config", str(REPO / CONFIG), "--nodes", "two", "--gpus-per-node", "0"])
    assert exit_info.value.code == 2
    assert "argument --nodes: invalid int value: 'two'" in capsys.readouterr().err


def test_submit_without_sbatch_on_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(cli(tmp_path)) == 1
    assert "error: sbatch not found on PATH" in capsys.readouterr().err


def test_submit_prints_job_id_and_paths(tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 977\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(cli(tmp_path)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Submitted Slurm job 977"
    assert out[1].split() == ["script:", str(tmp_path / "run" / "sbatch.sh")]
    assert out[2].split() == ["log:", str(tmp_path / "run" / "slurm-977.out")]
    assert (tmp_path / "run" / "sbatch.sh").is_file()
