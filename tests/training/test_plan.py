"""The run planner (issue 17): `--config.plan=auto` and its checks, its one-line errors, the `plan` command, XLA's
out-of-memory error explained, and (slow, 8 simulated CPU devices in tests/training/plan_program.py) predicted peak
memory against the real run's, the chosen candidate training through the recipe, and unsatisfiable requests.

CPU devices report no `memory_stats()`, so the real run's peak per device is its compiled train step's own account
(`memory_analysis()` of the executable the recipe's loop ran); the planner's figure is extrapolated from 1- and
2-layer compiles of abstract inputs, so the comparison checks the abstract model, shardings and the extrapolation.
"""
from __future__ import annotations

import dataclasses

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from automodel_jax.cli import finetune as finetune_cli
from automodel_jax.cli import plan as plan_cli
from automodel_jax.config import ConfigError, parse_config
from automodel_jax.training import plan, plan_run
from reference import REPO

LLM_CONFIG = str(REPO / "configs" / "llama_lora.py")
VLM_CONFIG = str(REPO / "configs" / "gemma3_vl_lora.py")
TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture
def weightless_model(tmp_path) -> Path:
    """A model directory with config.json and a tokenizer but no weights: whatever reads weights fails."""
    from automodel_jax.recipes.llm.embedded import build_tokenizer
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(TINY))
    build_tokenizer().save_pretrained(directory)
    return directory


def cli_argv(model: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["--config", LLM_CONFIG, f"--config.model.path={model}", f"--config.run_dir={run_dir}",
            "--config.model.dtype=float32", "--config.data.train.kind=mock", "--config.data.validation.kind=mock",
            "--config.data.train.vocab_size=256", "--config.data.validation.vocab_size=256",
            "--config.data.seq_len=64", "--config.train.global_batch_size=8", "--config.train.micro_batch_size=8",
            "--config.train.max_steps=1", "--config.train.sample_prompts=()", "--config.plan.remat=('none',)",
            "--config.optim.schedule.warmup_steps=0", *overrides]


def run_module(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)


def test_a_section_with_a_mode_takes_it_as_its_value():
    cfg = parse_config(["--config", LLM_CONFIG, "--config.plan=auto"])
    assert cfg.plan.mode == "auto"
    with pytest.raises(ConfigError, match="config key 'optim' is a section; set its fields"):
        parse_config(["--config", LLM_CONFIG, "--config.optim=adamw"])


@pytest.mark.parametrize(("override", "message"), [
    ("--config.plan=often", "plan.mode must be one of 'off', 'check', 'auto'; got 'often'"),
    ("--config.plan.remat=('none','fast')", "plan.remat ('none', 'fast') must be a non-empty tuple of 'none', "
                                            "'full', 'save_dots'; 'fast' is not one"),
    ("--config.plan.mesh_axes=('data','pipeline')", "'pipeline' is not one"),
    ("--config.plan.margin=1.5", "plan.margin must be in (0, 1]"),
    ("--config.plan.device_memory_gb=0", "plan.device_memory_gb must be positive"),
])
def test_bad_plan_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as error:
        finetune_cli.load_config(["--config", LLM_CONFIG, override])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (("--config.optim.schedule.warmup_steps=5",), "optim.schedule.warmup_steps must be in [0, total_steps=1), got 5; "
     "lower optim.schedule.warmup_steps or train longer (train.max_steps, train.num_epochs)"),
    (("--config.optim.grad_clip=-1.0",), "optim.grad_clip must be >= 0 (0 = off), got -1.0"),
    (("--config.checkpoint.keep=0",), "checkpoint.keep must be >= 1, got 0"),
    (("--config.logging.wandb.enabled=true", "--config.logging.wandb.mode=local"),
     "wandb.mode must be one of 'offline', 'online'; got 'local'"),
], ids=["warmup_past_max_steps", "grad_clip", "checkpoint_keep", "wandb_mode"])
def test_cheap_config_errors_come_before_planning(weightless_model, tmp_path, monkeypatch, capsys, overrides,
                                                  message):
    """A bad setting that needs no model, data or devices is its one error line at once, not after the planner
    compiled the run (the planner fails the test if it starts)."""
    def planner_started(*args, **kwargs):
        raise AssertionError("the planner ran before the config was checked")
    monkeypatch.setattr(plan.Planner, "__init__", planner_started)
    argv = cli_argv(weightless_model, tmp_path / "run", "--config.plan=auto", "--config.plan.device_memory_gb=1",
                    *overrides)
    assert finetune_cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "run").exists()


def test_warmup_of_a_run_by_epochs_is_checked_once_its_length_is_known(weightless_model, tmp_path):
    """Without train.max_steps the run's length comes from its data: the config alone is not refused."""
    cfg = finetune_cli.load_config(cli_argv(weightless_model, tmp_path / "run", "--config.train.max_steps=None",
                                            "--config.optim.schedule.warmup_steps=5"))
    assert cfg.train.max_steps is None and cfg.optim.schedule.warmup_steps == 5


def test_plan_on_a_vlm_config_is_one_error_line(capsys):
    with pytest.raises(ConfigError, match="config key 'plan' is one of the LLM recipe's, and this config runs the "
                                          "VLM recipe"):
        finetune_cli.load_config(["--config", VLM_CONFIG, "--config.plan=auto"])
    assert plan_cli.main(["--config", VLM_CONFIG]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == ("error: python -m automodel_jax.plan plans LLM fine-tuning runs only; this config runs the VLM "
                    "recipe")


def test_mesh_factorisations_cover_every_layout_once():
    meshes = plan.mesh_factorisations(8, ("data", "fsdp", "tensor"))
    assert len(meshes) == len(set(meshes)) == 10  # 2^3 spread over 3 axes: C(5, 2)
    for mesh in meshes:
        sizes = dict(mesh)
        assert sizes["data"] * sizes["fsdp"] * sizes["tensor"] == 8 and sizes["context"] == 1
    assert plan.mesh_factorisations(6, ("fsdp",)) == [tuple((a, 6 if a == "fsdp" else 1) for a in plan.MESH_AXES)]


def test_estimated_flops_are_the_models_training_flops(weightless_model, tmp_path):
    """The step-time estimate's flops (counted on the lowered step, so that a GPU's library-call matmuls count too)
    are the training FLOPs of PaLM's formula (6 N + 12 L H Q T per token; `training.metrics`) for a full SFT, within
    the elementwise work (norms, softmax, loss, AdamW) the formula leaves out."""
    cfg = finetune_cli.load_config(cli_argv(weightless_model, tmp_path / "run", "--config.peft.method=none",
                                            "--config.plan.device_memory_gb=1"))
    planner = plan.Planner(cfg, str(weightless_model), memory=10 ** 9)
    row = planner.predict(planner.own())
    h, kv, f, layers, heads = 64, 32, 128, 2, 4
    params = layers * (2 * h * h + 2 * h * kv + 3 * h * f) + h * TINY["vocab_size"]  # untied lm_head
    tokens, seq = 8 * 64, 64
    palm = (6 * params + 12 * layers * heads * (h // heads) * seq) * tokens
    assert row.full_depth and 1.0 <= row.figures.flops / palm < 1.15, (row.figures.flops, palm)
    # The same global batch in 4 micro-steps: the loop's body counts once per trip, so the step's flops stay.
    accumulated = planner.predict(dataclasses.replace(planner.own(), micro_batch=2))
    assert accumulated.accum == 4 and accumulated.figures.flops == pytest.approx(row.figures.flops, rel=0.02)


def test_xla_out_of_memory_is_explained_in_one_line(weightless_model, tmp_path):
    """A real RESOURCE_EXHAUSTED from XLA (a 4 TiB array on the CPU) inside a run: one line with XLA's own words, the
    plan's predicted peak of the run's settings, the device memory and the nearest fitting choice."""
    cfg = finetune_cli.load_config(cli_argv(weightless_model, tmp_path / "run"))
    cfg.mesh.update(data=1, fsdp=1)  # one device: this process may have any number

    def allocate_too_much():
        jax.jit(lambda: jnp.zeros((2 ** 40,), jnp.float32))().block_until_ready()

    with pytest.raises(plan_run.OutOfDeviceMemory) as error:
        with plan_run.explained_out_of_memory(cfg, lambda: str(weightless_model)):
            allocate_too_much()
    assert str(error.value).startswith("out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating")
    assert "set plan.device_memory_gb to have the planner name a fitting choice" in str(error.value)

    cfg.plan.device_memory_gb = 0.004  # micro-batch 8 (~5 MB) does not fit plan.margin of it, smaller ones do
    with pytest.raises(plan_run.OutOfDeviceMemory) as error:
        with plan_run.explained_out_of_memory(cfg, lambda: str(weightless_model)):
            allocate_too_much()
    message = str(error.value)
    assert "\n" not in message and "against 0.004 GB of device memory" in message
    assert "nearest fitting choice: mesh data=1, model.remat=none, loss.impl=chunked, train.micro_batch_size=" in \
        message


@pytest.mark.slow  # a real process that compiles (about a minute on 2 CPU cores)
def test_plan_command_prints_the_table(weightless_model, tmp_path):
    """`python -m automodel_jax.plan` loads no weights (the model has none) and prints the table; without a device
    memory on a CPU it is one error line."""
    done = run_module("automodel_jax.plan", cli_argv(weightless_model, tmp_path / "run",
                                                     "--config.plan.device_memory_gb=1"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("plan for 1 x cpu: 1 GB per device, budget plan.margin 0.9 = 0.9 GB")
    assert lines[1].split() == ["mesh", "remat", "loss", "micro", "x", "accum", "GB/device", "est.", "s/step",
                                "measured", "s/step"]
    chosen = [line for line in lines[2:] if "chosen" in line]  # "chosen, config's own": its own micro-batch fits
    assert len(chosen) == 1 and chosen[0].split()[:6] == ["one", "device", "none", "chunked", "8", "x"]
    assert not (tmp_path / "run").exists()  # printed only

    done = run_module("automodel_jax.plan", cli_argv(weightless_model, tmp_path / "run"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("error: plan: cpu devices report no memory size; set "
                                                    "plan.device_memory_gb")


@pytest.mark.slow  # a real process that compiles (about a minute on 2 CPU cores)
def test_check_stops_a_run_that_does_not_fit_before_loading_weights(weightless_model, tmp_path):
    """plan=check (the default) with the run's own micro-batch 8 over the memory: one error line naming the predicted
    peak, the device memory and the nearest fitting choice, before any weight is read (the model has none)."""
    done = run_module("automodel_jax.finetune", cli_argv(weightless_model, tmp_path / "run",
                                                         "--config.plan.device_memory_gb=0.004"))
    assert done.returncode == 2, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: this run is predicted not to fit: ") and "GB per device against 0.004 GB of " \
        "device memory (plan.margin 0.9); nearest fitting choice: mesh data=1, model.remat=none, " \
        "loss.impl=chunked, train.micro_batch_size=" in line


# --- 8 simulated devices ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_program")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["AUTOMODEL_JAX_CACHE"] = str(out / "cache")
    done = subprocess.run([sys.executable, "-m", "tests.training.plan_program", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "record.json").read_text())


@pytest.mark.slow
def test_predicted_peak_is_within_ten_percent_of_the_real_run(record):
    assert record["devices"] == 8
    assert record["memory_stats"] is None  # why the real run's compiled step is the measure on CPU
    for name, figures in record["accuracy"].items():
        # extrapolated from the 1- and 2-layer probes, or compiled at full depth when the layers are scanned
        assert figures["full_depth"] == name.endswith("_scan"), name
        assert abs(figures["predicted"] - figures["real"]) <= 0.1 * figures["real"], (name, figures)


@pytest.mark.slow
def test_auto_trains_the_chosen_candidate_and_records_the_plan(record):
    auto, budget = record["auto"], 0.9 * record["auto_memory_gb"] * 1e9
    planned = auto["plan"]
    rows = planned["rows"]
    [chosen] = [row for row in rows if row["note"].startswith("chosen")]
    assert chosen["settings"] == planned["chosen"] and chosen["full_depth"]
    assert chosen["peak_bytes"] <= budget and chosen["measured_step_s"] > 0
    for row in rows:
        assert ("over memory" in row["note"]) == (row["peak_bytes"] > budget), row
    assert any("over memory" in row["note"] for row in rows)  # the budget does exclude some
    measured = [row for row in rows if row["measured_step_s"] is not None]
    assert chosen["measured_step_s"] == min(row["measured_step_s"] for row in measured)
    # Trained with it: the run's config holds the choice; losses are finite.
    assert auto["steps"] == 2 and all(0 < loss < 10 for loss in auto["loss"])
    settings = planned["chosen"]
    assert auto["config"]["train"]["micro_batch_size"] == settings["train.micro_batch_size"]
    assert auto["config"]["model"]["remat"] == settings["model.remat"]
    assert {k: auto["config"]["mesh"][k] for k in settings["mesh"]} == settings["mesh"]
    assert "chosen" in auto["printed"] and "| chosen" in auto["plan_md"]
    assert "plan: training with mesh " in auto["printed"]
    # A second start of the same run reuses plan.json.
    reuse = record["reuse"]
    assert reuse["printed"].startswith("plan: reusing ")  # the plan's mesh is the first topology line
    # A config mesh that does not fit the devices: the plan chooses one and says so against the config's.
    foreign = record["foreign_mesh"]
    assert foreign["mesh"]["fsdp"] == 8
    assert "plan: training with mesh fsdp=8, model.remat=none" in foreign["printed"]
    assert "(the config's own: mesh data=1 x fsdp=1 x " in foreign["printed"]
    assert (reuse["micro"], reuse["remat"]) == (settings["train.micro_batch_size"], settings["model.remat"])
    assert reuse["mesh"] == {**reuse["mesh"], **settings["mesh"]}


@pytest.mark.slow
def test_unsatisfiable_requests_are_one_line_errors(record):
    for key in ("too_small", "indivisible", "check"):
        assert "\n" not in record[key], key
    assert record["too_small"].startswith("no candidate fits plan.margin 0.9 x 1e-06 GB of device memory: the "
                                          "smallest predicted peak is ")
    assert record["indivisible"] == ("no mesh of 8 devices over plan.mesh_axes (data, fsdp) can run this: "
                                     "train.global_batch_size 12 is not divisible by data x fsdp = 8; change "
                                     "train.global_batch_size, data.seq_len or plan.mesh_axes")
    assert record["check"].startswith("this run is predicted not to fit: ")
    assert "nearest fitting choice: mesh fsdp=8, model.remat=" in record["check"]
