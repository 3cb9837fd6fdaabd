"""The recipe-facing planning phase (`plan.mode`): between building the mesh and loading weights, the run's own
settings are checked or the run is planned (`training.plan` compiles the candidates), and XLA's out-of-memory errors
during a run are explained with the planner's figures.

Modes: "off"; "check" (default): the run's own settings are predicted, and a run that would not fit stops before
loading weights with one line naming the predicted peak, the device memory and the nearest fitting choice; "auto":
the run is planned (`training.plan.make_plan`), the table printed and written to the run directory (plan.md,
plan.json; a resumed run reuses plan.json), and the run trains with the choice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator

import jax

from automodel_jax.launcher.distributed import describe_topology
from automodel_jax.parallel.sharding import MESH_AXES, mesh_from_config
from automodel_jax.training.loop import TrainingError
from automodel_jax.training.plan import Candidate, Planner, PlanError, device_memory_bytes, make_plan, plan_key
from automodel_jax.training.trainer import Started

log = logging.getLogger("automodel_jax.plan")

PLAN_JSON, PLAN_MD = "plan.json", "plan.md"


class OutOfDeviceMemory(TrainingError):
    """XLA ran out of device memory during a run (RESOURCE_EXHAUSTED), explained in one line by the planner."""


def apply_settings(cfg, settings: dict) -> None:
    """Set a candidate's `settings` (Candidate.settings, or plan.json's "chosen") into a config."""
    cfg.mesh.update(settings["mesh"])
    cfg.model.remat = settings["model.remat"]
    cfg.loss.impl = settings["loss.impl"]
    cfg.train.micro_batch_size = settings["train.micro_batch_size"]


def check_own_settings(cfg, model_path: str, memory: int) -> None:
    """plan.mode=check: PlanError (one line: predicted peak, device memory, nearest fitting choice) when the run's
    own settings are predicted over plan.margin x device memory. Settings the recipe will refuse anyway (a mesh that
    does not divide the model or batch) are left to its own checks."""
    planner = Planner(cfg, model_path, memory)
    own = planner.own()
    if planner.mesh_problem(own.mesh) or cfg.train.global_batch_size % (own.micro_batch * own.data_parallel):
        return
    row = planner.predict(own)
    if planner.fits(row):
        log.info("plan: predicted peak %.3g GB per device of %.3g GB (plan.margin %g): fits", row.peak_gb,
                 memory / 1e9, cfg.plan.margin)
        return
    raise PlanError(f"this run is predicted not to fit: {row.peak_gb:.3g} GB per device against "
                    f"{memory / 1e9:.3g} GB of device memory (plan.margin {cfg.plan.margin:g}); "
                    f"{nearest_choice(planner, own)}")


def nearest_choice(planner: Planner, own: Candidate) -> str:
    """'nearest fitting choice: ...' (or that none fits), for the one-line errors. The search's rows are
    extrapolated from shallow compiles; the one named is compiled at full depth first, and one that does not fit
    there gives way to the next nearest (H200, 8B full SFT: remat full at micro-batch 4 extrapolated to ~100 GB,
    compiled 114 GB, and ran out of memory)."""
    try:
        rows = planner.search(verify=False)
    except PlanError as e:
        return f"no candidate fits ({e})"
    while (row := planner.nearest_fitting(rows, own)) is not None and not row.full_depth:
        rows[rows.index(row)] = planner.predict(row.candidate, full_depth=True)
    if row is None:
        return str(planner.unsatisfiable(rows))
    return f"nearest fitting choice: {row.candidate.describe()} ({row.peak_gb:.3g} GB; or --config.plan=auto)"


def prepare_run(cfg, started: Started, model_path: str) -> Started:
    """The recipe's planning phase, after the mesh is built and before weights load (see the module docstring):
    "check" checks the run's own settings, "auto" plans, prints and records the plan, sets the chosen settings into
    `cfg` and the config the run saves, and returns `started` with the chosen mesh."""
    mode = cfg.plan.mode
    if mode == "off":
        return started
    memory = device_memory_bytes(cfg.plan)
    if mode == "check":
        if memory is None:
            log.debug("plan: memory check skipped: %s devices report no memory size (set plan.device_memory_gb to "
                     "check)", jax.local_devices()[0].platform)
        else:
            check_own_settings(cfg, model_path, memory)
        return started
    saved = started.run_dir / PLAN_JSON
    record = json.loads(saved.read_text()) if saved.is_file() else None
    if record is not None and record.get("key") == plan_key(cfg, jax.devices()):
        settings = record["chosen"]
        print(f"plan: reusing {saved} (the run's model, data, batch, optimizer, plan and devices are unchanged): "
              f"{', '.join(f'{k}={v}' for k, v in settings.items())}", flush=True)
    else:
        plan = make_plan(cfg, model_path)
        settings = plan.chosen.candidate.settings()
        if started.primary:
            print(plan.table(), flush=True)
            print(f"plan: training with {plan.chosen.candidate.describe()} (the config's own: mesh "
                  f"{' x '.join(f'{a}={cfg.mesh.get(a, 1)}' for a in MESH_AXES)}, model.remat="
                  f"{cfg.model.remat}, loss.impl={cfg.loss.impl}, train.micro_batch_size="
                  f"{cfg.train.micro_batch_size})", flush=True)
        # Written with the config once the run starts (`trainer.record_config`): a run that fails first writes nothing.
        files = {PLAN_MD: plan.markdown(), PLAN_JSON: json.dumps(plan.record(), indent=2) + "\n"}
        started = dataclasses.replace(started, run_files={**started.run_files, **files})
    for config in (cfg, started.config):
        apply_settings(config, settings)
    mesh, rules = mesh_from_config(cfg.mesh)
    describe_topology(mesh)
    return dataclasses.replace(started, mesh=mesh, rules=rules)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


@contextlib.contextmanager
def explained_out_of_memory(cfg, model_path: Callable[[], str]) -> Iterator[None]:
    """Turn XLA's RESOURCE_EXHAUSTED inside the block into OutOfDeviceMemory: one line with XLA's own first line,
    the planner's predicted peak of the run's settings, the device memory and the nearest fitting choice (as far
    as they can be known: CPUs report no memory unless plan.device_memory_gb is set). `model_path` resolves the
    model's directory (called only on such an error)."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if not is_out_of_memory(error):
            raise
        first = str(error).strip().splitlines()[0]
        memory = device_memory_bytes(cfg.plan)
        if memory is None:
            advice = "set plan.device_memory_gb to have the planner name a fitting choice"
        else:
            planner = Planner(cfg, model_path(), memory)
            own = planner.own()
            advice = (f"predicted peak {planner.predict(own).peak_gb:.3g} GB per device against "
                      f"{memory / 1e9:.3g} GB of device memory; {nearest_choice(planner, own)}")
        raise OutOfDeviceMemory(f"out of device memory ({first}); {advice}") from None
