"""Run in a fresh process with 8 simulated CPU devices (XLA_FLAGS is set before jax is imported).

`python -m tests.training.plan_program OUT_DIR` plans a tiny 4-layer Llama (LoRA, mock rows) and writes record.json
for tests/training/test_plan.py:
  accuracy  for several candidates (mesh, remat, micro-batch, scanned layers or not): the planner's peak per
            device, extrapolated from 1- and 2-layer compiles of abstract inputs (at full depth when scanned), and
            the peak of the real run's compiled train step (the recipe's `setup`, one real step; CPU devices report
            no memory_stats, so the executable's own figures are the measure of the real run), and what
            `memory_stats()` says;
  auto      a budget between two micro-batches: the recipe's `run` with plan=auto and plan.measure_steps=1 trains the
            chosen candidate; its plan.json, plan.md and config.json; a second start reuses plan.json;
  errors    the one-line errors of unsatisfiable requests (memory too small for every candidate, a global batch no
            mesh divides) and of plan=check on settings that do not fit (raised before any weight is read: the
            model directory has none).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported
    # 8 simulated devices; the other two flags only cut CPU compile time (every compile here uses the same ones).
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")
    os.environ["JAX_PLATFORMS"] = "cpu"

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from automodel_jax import AutoModelForCausalLM, save_pretrained  # noqa: E402
from automodel_jax.recipes.llm import finetune  # noqa: E402
from automodel_jax.recipes.llm.embedded import build_tokenizer  # noqa: E402
from automodel_jax.training import plan, plan_run  # noqa: E402
from automodel_jax.training.trainer import start, train_loop  # noqa: E402

# 4 heads / 2 KV heads so that tensor=2 divides both.
TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
SEQ, GLOBAL_BATCH = 128, 16
# name: (mesh, remat, micro-batch, model.scan_layers)
ACCURACY = {
    "fsdp8_none_m2": (dict(data=1, fsdp=8), "none", 2, False),
    "data2_fsdp2_tensor2_full_m1": (dict(data=2, fsdp=2, tensor=2), "full", 1, False),
    "data8_save_dots_m1": (dict(data=8, fsdp=1), "save_dots", 1, False),
    "fsdp8_save_dots_m2_scan": (dict(data=1, fsdp=8), "save_dots", 2, True),
}


def write_model(directory: Path, weights: bool) -> Path:
    """The tiny model in HF format (with random weights, or config.json and tokenizer only)."""
    if weights:
        save_pretrained(AutoModelForCausalLM.from_config(TINY, seed=0), directory, overwrite=True)
    else:
        directory.mkdir(parents=True)
        (directory / "config.json").write_text(json.dumps(TINY))
    build_tokenizer().save_pretrained(directory)
    return directory


def config(model: Path, run_dir: Path, **plan_settings):
    cfg = finetune.default_config()
    cfg.run_dir = str(run_dir)
    cfg.model.update(path=str(model), dtype="float32")
    for split in ("train", "validation"):
        cfg.data[split].update(kind="mock", vocab_size=TINY["vocab_size"], num_samples=GLOBAL_BATCH * 4)
    cfg.data.seq_len = SEQ
    cfg.train.update(global_batch_size=GLOBAL_BATCH, micro_batch_size=2, max_steps=2, val_every=0, log_every=1,
                     val_max_samples=GLOBAL_BATCH, sample_prompts=())
    cfg.checkpoint.enabled = False
    cfg.export.when = "never"
    cfg.logging.tensorboard = False
    cfg.plan.update(**plan_settings)
    return cfg


def error_of(action) -> str:
    try:
        action()
    except plan.PlanError as e:
        return str(e)
    raise AssertionError("no PlanError")


def main(out: Path) -> None:
    model = write_model(out / "model", weights=True)
    record: dict = dict(devices=jax.device_count(), memory_stats=jax.devices()[0].memory_stats())

    # Accuracy: predicted (probes, abstract inputs) against the real run's compiled step.
    record["accuracy"] = {}
    for name, (mesh, remat, micro, scan) in ACCURACY.items():
        cfg = config(model, out / name, mode="off", device_memory_gb=1.0)
        cfg.mesh.update(mesh)
        cfg.model.update(remat=remat, scan_layers=scan)
        cfg.train.micro_batch_size = micro
        planner = plan.Planner(cfg, str(model), memory=10 ** 9)
        predicted = planner.predict(planner.own())
        run = finetune.setup(cfg)
        train_loop(run, until_step=1)
        real = plan.compiled_figures(run.train_step)
        run.close()
        record["accuracy"][name] = dict(predicted=predicted.figures.peak_bytes, real=real.peak_bytes,
                                        full_depth=predicted.full_depth,
                                        memory_stats=jax.devices()[0].memory_stats())
        print("accuracy", name, record["accuracy"][name], file=sys.stderr, flush=True)

    # Auto: a budget that takes micro-batch 1 but not 2 with remat none, on fsdp=8.
    fsdp = dict(mesh_axes=("fsdp",), remat=("none", "full"))
    probe = config(model, out / "probe", mode="auto", device_memory_gb=1.0, **fsdp)
    planner = plan.Planner(probe, str(model), memory=10 ** 9)
    mesh = tuple((a, 8 if a == "fsdp" else 1) for a in plan.MESH_AXES)
    small, large = (planner.predict(plan.Candidate(mesh, "none", "chunked", m)).figures.peak_bytes for m in (1, 2))
    memory_gb = (small + large) / 2 / 0.9 / 1e9
    record["auto_memory_gb"], record["probe_peaks"] = memory_gb, [small, large]
    cfg = config(model, out / "auto", mode="auto", device_memory_gb=memory_gb, measure_steps=1, **fsdp)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = finetune.run(cfg)
    run_dir = out / "auto"
    record["auto"] = dict(printed=printed.getvalue(), steps=result["steps"],
                          loss=[result["val_loss_before"], result["val_loss_after"]],
                          plan=json.loads((run_dir / plan_run.PLAN_JSON).read_text()),
                          plan_md=(run_dir / plan_run.PLAN_MD).read_text(),
                          config=json.loads((run_dir / "config.json").read_text()))
    again = config(model, out / "auto", mode="auto", device_memory_gb=memory_gb, measure_steps=1, **fsdp)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        started = plan_run.prepare_run(again, start(again), str(model))
    record["reuse"] = dict(printed=printed.getvalue(), mesh=dict(started.mesh.shape),
                           micro=again.train.micro_batch_size, remat=again.model.remat)

    # A config mesh for 1 device, not these 8: plan=auto chooses the mesh anyway (it used to fail after planning).
    foreign = config(model, out / "foreign", mode="auto", device_memory_gb=1.0, mesh_axes=("fsdp",),
                     remat=("none",))
    foreign.mesh.update(data=1, fsdp=1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        plan_run.prepare_run(foreign, start(foreign), str(model))
    record["foreign_mesh"] = dict(printed=printed.getvalue(), mesh=dict(foreign.mesh))

    # Errors.
    tiny = config(model, out / "tiny", mode="auto", device_memory_gb=1e-6, mesh_axes=("fsdp",), remat=("full",))
    record["too_small"] = error_of(lambda: plan.make_plan(tiny, str(model)))
    odd = config(model, out / "odd", mode="auto", device_memory_gb=1.0, mesh_axes=("data", "fsdp"))
    odd.train.update(global_batch_size=12, micro_batch_size=1)
    record["indivisible"] = error_of(lambda: plan.make_plan(odd, str(model)))
    no_weights = write_model(out / "no_weights", weights=False)
    check = config(no_weights, out / "check", mode="check", device_memory_gb=memory_gb, **fsdp)
    check.mesh.update(data=1, fsdp=8)
    record["check"] = error_of(lambda: finetune.setup(check))
    (out / "record.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(model)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
