"""JAX's persistent compilation cache, as the real commands set it up: the first run of a config writes its compiled
programs into xla/ in the project's cache directory, a second identical run loads them (JAX logs a cache hit for the
train step) and trains to the same losses, `train.compilation_cache=false` neither reads nor writes it, generate uses
it too, and a directory that cannot be written is one error line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from automodel_jax.cli import finetune as finetune_cli
from automodel_jax.config.cache import enable_compilation_cache
from reference import STORIES
from test_finetune import SUMMARY, error_line, hellaswag, stories_argv  # noqa: F401 - hellaswag is a fixture

HIT = re.compile(r"Persistent compilation cache hit for '(\w+)'")


def run_command(module: str, argv: list[str], cache: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m automodel_jax.MODULE ARGV` with the project cache at `cache` and JAX logging every compile (cache
    hits included); the test process's JAX_ENABLE_COMPILATION_CACHE=false (conftest) is not passed on."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_COMPILATION_CACHE"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", AUTOMODEL_JAX_CACHE=str(cache), JAX_LOG_COMPILES="1")
    done = subprocess.run([sys.executable, "-m", f"automodel_jax.{module}", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()} if directory.is_dir() else set()


@pytest.mark.slow
def test_a_rerun_loads_the_compiled_train_step_and_the_switch_turns_the_cache_off(hellaswag, tmp_path):
    train, validation = hellaswag
    cache = tmp_path / "cache"
    xla = cache / "xla"

    def finetune(name: str, *overrides: str) -> subprocess.CompletedProcess:
        argv = stories_argv(tmp_path / name, train, validation, "--config.export.when=never", *overrides)
        return run_command("finetune", argv, cache, tmp_path)

    first = finetune("first")
    written = entries(xla)
    steps = {name for name in written if name.startswith("jit_step-")}
    assert len(steps) == 1, sorted(written)  # the train step is among the programs written
    assert not HIT.search(first.stderr)

    second = finetune("second")  # the same config in another run directory
    assert "jit_step" in HIT.findall(second.stderr)
    assert entries(xla) == written  # everything it compiled came from the cache
    assert SUMMARY.search(second.stdout).groups() == SUMMARY.search(first.stdout).groups()

    (xla / steps.pop()).unlink()  # with the cache on, a run would hit the rest and write the train step again
    off = finetune("off", "--config.train.compilation_cache=false")
    assert not HIT.search(off.stderr)
    assert entries(xla) == written - {name for name in written if name.startswith("jit_step-")}

    run_command("generate", ["--model", str(STORIES), "--prompt", "Once upon", "--max-new-tokens", "4"], cache,
                tmp_path)
    assert len(entries(xla)) > len(written)  # generation's own programs


def test_a_cache_directory_that_cannot_be_written_is_one_error_line(hellaswag, tmp_path, capsys, monkeypatch):
    train, validation = hellaswag
    taken = tmp_path / "a_file"
    taken.write_text("not a directory")
    argv = stories_argv(tmp_path / "run", train, validation, f"--config.train.compilation_cache_dir={taken}")
    was = jax.config.jax_enable_compilation_cache  # off in the test process (conftest); the check runs when on
    jax.config.update("jax_enable_compilation_cache", True)
    try:
        assert finetune_cli.main(argv) == 2
        with pytest.raises(ValueError, match=f"directory {taken / 'xla'} cannot be written .*"
                                             "JAX_ENABLE_COMPILATION_CACHE=false"):  # generate's and evaluate's fix
            enable_compilation_cache(directory=str(taken / "xla"))
        monkeypatch.setenv("AUTOMODEL_JAX_CACHE", str(taken))  # the variable that chose it is named
        with pytest.raises(ValueError, match=re.escape(f"directory {taken / 'xla'} (from $AUTOMODEL_JAX_CACHE) "
                                                       "cannot be written")):
            enable_compilation_cache()
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
    assert jax.config.jax_compilation_cache_dir is None  # nothing was set
    line = error_line(capsys)
    assert f"compilation cache directory {taken} cannot be written" in line, line
    assert "train.compilation_cache_dir" in line and "train.compilation_cache=false" in line, line
    assert not (tmp_path / "run").exists()
