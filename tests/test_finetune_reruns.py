"""Running the finetune command again on a run directory, as users do: a finished run says it is complete (exit 0)
and changes nothing; a failed attempt never rewrites the config the checkpoints were made with, and a failure before
the run starts leaves no run directory; resuming with a changed config (a new learning rate) says so in one line
naming every changed key; `generate --model RUN_DIR` on a LoRA run points at --adapter. The minimum learning rate of
every config follows an overridden learning rate."""
from __future__ import annotations

import json
import shutil

import pytest

from automodel_jax.cli import finetune as finetune_cli
from automodel_jax.cli import generate as generate_cli
from automodel_jax.config import config_file_presets, parse_config
from automodel_jax.training.optim import build_schedule
from reference import REPO, STORIES
from test_finetune import hellaswag, isolated, stories_argv  # noqa: F401 - fixtures shared with the recipe's tests

CONFIG_FILES = ("config.json", "config.py")


@pytest.fixture(scope="module")
def finished_run(hellaswag, tmp_path_factory):  # noqa: F811
    """(argv, run dir) of a 2-step LoRA run of stories260K that finished and exported its adapter."""
    train, validation = hellaswag
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    argv = stories_argv(run_dir, train, validation, "--config.checkpoint.every_steps=1")
    assert finetune_cli.main(argv) == 0
    assert (run_dir / "export" / "adapter_config.json").is_file()
    return argv, run_dir


def rerun_copy(finished_run, tmp_path, capsys, marker: str, *overrides: str):
    """(copy's run dir, the original) after running the command on a copy of the finished run with `overrides`;
    asserts it succeeds and returns the one printed line holding `marker` too."""
    argv, original = finished_run
    run_dir = tmp_path / "copy"
    shutil.copytree(original, run_dir)
    capsys.readouterr()
    assert finetune_cli.main(argv + [f"--config.run_dir={run_dir}", *overrides]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if marker in line]
    return run_dir, original, line


def snapshot(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_rerunning_a_finished_run_says_it_is_complete_and_changes_nothing(finished_run, capsys):
    argv, run_dir = finished_run
    before = snapshot(run_dir)
    capsys.readouterr()
    assert finetune_cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out == (f"run {run_dir} is complete: 2 steps, exported to {run_dir / 'export'}; nothing to do (another "
                   "run_dir starts a new run; a higher train.max_steps with export.overwrite=true continues this "
                   "one)\n")
    assert "error" not in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("mistake", [["--config.data.train.path={missing}"], ["--config.model.path={missing}"]],
                         ids=["typo_in_data_path", "another_model"])
def test_a_failed_attempt_keeps_the_config_the_checkpoints_were_made_with(finished_run, tmp_path, capsys, mistake):
    argv, run_dir = finished_run
    before = {name: (run_dir / name).read_bytes() for name in CONFIG_FILES}
    missing = tmp_path / "missing"
    argv = argv + ["--config.train.max_steps=3", "--config.export.overwrite=true"] + [
        m.format(missing=missing) for m in mistake]
    assert finetune_cli.main(argv) == 2
    assert str(missing) in capsys.readouterr().err
    assert {name: (run_dir / name).read_bytes() for name in CONFIG_FILES} == before


def test_a_run_that_fails_before_it_starts_leaves_no_run_directory(hellaswag, tmp_path, capsys):  # noqa: F811
    """Also: loading a data file the datasets cache has not seen prints no "Generating train split" progress bar."""
    train, validation = hellaswag
    fresh = tmp_path / "fresh.jsonl"
    shutil.copy(train, fresh)
    run_dir = tmp_path / "run"
    argv = stories_argv(run_dir, fresh, validation, f"--config.data.validation.path={tmp_path / 'typo.jsonl'}")
    assert finetune_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "typo.jsonl" in err and "Generating" not in err and "examples/s" not in err, err
    assert not run_dir.exists()


def test_resuming_with_a_changed_config_says_which_keys_changed_and_records_the_new_config(finished_run, tmp_path,
                                                                                          capsys):
    """A copy of the finished run continued for one more step at another learning rate: one line names every
    changed key with its old and new value; config.json then holds the config the new checkpoint was made with."""
    run_dir, _, line = rerun_copy(finished_run, tmp_path, capsys, "differs", "--config.train.max_steps=3",
                                  "--config.optim.learning_rate=1e-3", "--config.export.overwrite=true")
    assert line == (f"resuming {run_dir / 'checkpoints' / '2'} with a config that differs from the one it was saved "
                    "with: export.overwrite: False -> True; optim.learning_rate: 0.005 -> 0.001; "
                    "optim.schedule.min_learning_rate: 0.0005 -> 0.0001; train.max_steps: 2 -> 3 (config.json "
                    "records the new one; the checkpoint keeps its own)")
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["optim"]["learning_rate"] == 1e-3 and saved["train"]["max_steps"] == 3
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "3"]  # checkpoint.keep=2


def test_generate_on_a_lora_run_directory_points_at_the_adapter(finished_run, capsys):
    _, run_dir = finished_run
    assert generate_cli.main(["--model", str(run_dir), "--prompt", "Once"]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"it is a LoRA run whose export {run_dir / 'export'} is a PEFT adapter: pass --model {STORIES} " \
           f"--adapter {run_dir / 'export'}" in line, line


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_preset_takes_a_learning_rate_below_its_default_minimum(path):
    """The minimum learning rate is a tenth of the learning rate, also when the learning rate is overridden (a fixed
    minimum made every lower learning rate an error); an explicit minimum still wins."""
    presets, _ = config_file_presets(path)
    for preset in presets:
        cfg = parse_config(["--config", f"{path}:{preset}", "--config.optim.learning_rate=1e-9"])
        assert cfg.optim.schedule.min_learning_rate == pytest.approx(1e-10)
        schedule = build_schedule(cfg.optim, 100)
        # A constant schedule (NeMo's FP8 HellaSwag recipe) stays at the learning rate; the others end at the minimum.
        end = 1e-9 if cfg.optim.schedule.name == "constant" else 1e-10
        assert float(schedule(100)) == pytest.approx(end, rel=1e-6)
        fixed = parse_config(["--config", f"{path}:{preset}", "--config.optim.schedule.min_learning_rate=0",
                              "--config.optim.learning_rate=1e-9"])
        assert fixed.optim.schedule.min_learning_rate == 0.0


def test_a_run_that_does_not_resume_the_checkpoints_beside_it_says_it_replaces_their_config(finished_run, tmp_path,
                                                                                           capsys):
    """checkpoint.enabled=false on a run dir with checkpoints trains afresh: config.json is replaced, said in one
    line naming the changed keys."""
    run_dir, original, line = rerun_copy(finished_run, tmp_path, capsys, "does not resume",
                                         "--config.checkpoint.enabled=false", "--config.train.max_steps=1",
                                         "--config.export.when=never")
    assert line == (f"{run_dir} holds checkpoints that this run does not resume; its config.json is replaced by this "
                    f"run's: checkpoint.enabled: True -> False; export.when: 'final' -> 'never'; run_dir: "
                    f"'{original}' -> '{run_dir}'; train.max_steps: 2 -> 1")
    assert json.loads((run_dir / "config.json").read_text())["checkpoint"]["enabled"] is False
