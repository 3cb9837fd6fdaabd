"""The run planner's candidate search (`plan` config section): choose the mesh, activation checkpointing, loss
implementation and micro-batch so that a run fits its devices, before any weight is loaded.

Each candidate's REAL train step (`training.step`: `make_train_step` + `compile_steps`, the shardings the run
declares) is compiled on abstract inputs (`jax.ShapeDtypeStruct`, the model from `nnx.eval_shape`: no weights). Its
per-device peak memory is the compiled executable's own account (`memory_analysis()`: arguments + outputs - donated
aliases + temporaries + generated code), its step time an estimate: the lowered step's matmul flops (`training.hlo_flops`) / peak
FLOP/s + bytes accessed by the compiled one (XLA's cost analysis, which counts the micro-batch loop's body once) times
the accumulation steps / HBM bandwidth. To plan fast, candidates are compiled with 1 and 2 decoder layers and
extrapolated linearly in depth; the one chosen is compiled at full depth before it is trusted (with
`model.scan_layers` every candidate is compiled at full depth: a scan compiles one layer whatever the depth; the
bytes accessed then count the layer loop's body once). Micro-batch: the
largest divisor of the per-data-replica batch whose peak fits (memory grows with it: bisection).

`make_plan` plans a run ("auto": every candidate of `plan.remat` x `plan.loss_impl` x the meshes over
`plan.mesh_axes` is planned, those over `plan.margin` x device memory dropped, the rest ranked by estimated time or
by timing `plan.measure_steps` real steps of the best TOP_MEASURED, with random-init weights). The recipe's planning
phase (the modes, the files it writes, out-of-memory errors explained) is `training.plan_run`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from automodel_jax.checkpoint.hf import read_hf_config, resolve_checkpoint_dir
from automodel_jax.config import ConfigError, validate_choice
from automodel_jax.losses.cross_entropy import IMPLS as LOSS_IMPLS
from automodel_jax.models.base import REMAT_POLICIES, family_config
from automodel_jax.models.layers import amax_histories, apply_fp8
from automodel_jax.parallel.sharding import (MESH_AXES, MeshConfigError, check_mesh_fits, make_mesh, rules_for,
                                             tree_shardings)
from automodel_jax.peft.lora import apply_lora, split_model
from automodel_jax.training.hlo_flops import matmul_flops
from automodel_jax.training.metrics import peak_tflops
from automodel_jax.training.optim import build_optimizer
from automodel_jax.training.step import LLM_BATCH, compile_steps, make_eval_step, make_train_step, state_layout

log = logging.getLogger("automodel_jax.plan")

MODES = ("off", "check", "auto")
PROBE_LAYERS = (1, 2)  # depths compiled to extrapolate a candidate's figures linearly to the model's depth
TOP_MEASURED = 3  # with plan.measure_steps > 0, how many of the best estimated candidates are timed
# HBM bandwidth per device in TB/s, matched in this order against jax's device_kind (vendors' data sheets: NVIDIA
# H200 4.8, H100 SXM 3.35, H100 PCIe 2.0, B200 8.0, A100 80GB 2.0, L40S 0.864, L4 0.3; Google Cloud TPU pages).
HBM_TB_PER_S = (("H100 PCIe", 2.0), ("H100", 3.35), ("H200", 4.8), ("B200", 8.0), ("A100", 2.0), ("L40S", 0.864),
                ("L4", 0.3), ("TPU v4", 1.2), ("TPU v5 lite", 0.819), ("TPU v5p", 2.765), ("TPU v6 lite", 1.64))
# (TFLOP/s, TB/s) for a device with no known peak (a CPU): its estimates only rank candidates against each other.
NOMINAL_PEAKS = (1.0, 0.1)
# Packed rows are planned with this layout promise: any n > 1 takes the same attention path, and the arrays it
# sizes ([batch, n]) are negligible next to the activations.
PACKED_MAX_SEGMENTS = 2
# What a candidate sets, as config keys.
PLANNED_KEYS = ("mesh", "model.remat", "loss.impl", "train.micro_batch_size")


def plan_defaults() -> ConfigDict:
    """The `plan` config section (see this module's and `training.plan_run`'s docstrings): mode, measure_steps
    (0 = rank by estimate), device_memory_gb (None = the device's own `memory_stats()["bytes_limit"]`; CPUs report
    none), margin (the fraction of device memory a plan may use), and the candidate lists: remat policies, loss
    implementations and the mesh axes the devices are factored over (add "context" for long sequences)."""
    return ConfigDict(dict(mode="check", measure_steps=0, device_memory_gb=placeholder(float), margin=0.9,
                           remat=REMAT_POLICIES, loss_impl=("chunked",), mesh_axes=("data", "fsdp", "tensor")))


class PlanError(ConfigError):
    """No candidate fits, or the run's own settings do not; the one-line message names the figures and the fix."""


def check_plan_config(plan: ConfigDict) -> None:
    """ConfigError naming a bad `plan` key, before anything is built."""
    validate_choice(plan, "mode", MODES, prefix="plan")
    for key, known in (("remat", REMAT_POLICIES), ("loss_impl", LOSS_IMPLS), ("mesh_axes", MESH_AXES)):
        values = tuple(plan[key])
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise ConfigError(f"plan.{key} {values!r} must be a non-empty tuple of {', '.join(map(repr, known))}"
                              + (f"; {bad[0]!r} is not one" if bad else ""))
    if not 0 < plan.margin <= 1:
        raise ConfigError(f"plan.margin must be in (0, 1] (the fraction of device memory a plan may use), got "
                          f"{plan.margin}")
    if plan.measure_steps < 0:
        raise ConfigError(f"plan.measure_steps must be >= 0 (0 = rank by estimate), got {plan.measure_steps}")
    if plan.device_memory_gb is not None and plan.device_memory_gb <= 0:
        raise ConfigError(f"plan.device_memory_gb must be positive (or None: the device's own), got "
                          f"{plan.device_memory_gb}")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to run: mesh sizes (over MESH_AXES), remat policy, loss implementation, micro-batch (rows per data
    replica per micro-step)."""
    mesh: tuple[tuple[str, int], ...]
    remat: str
    loss_impl: str
    micro_batch: int

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def data_parallel(self) -> int:
        return self.mesh_shape["data"] * self.mesh_shape["fsdp"]

    def label(self) -> str:
        return " ".join(f"{a}={s}" for a, s in self.mesh if s > 1) or "one device"

    def settings(self) -> dict:
        """The config values this candidate sets (PLANNED_KEYS)."""
        return {"mesh": self.mesh_shape, "model.remat": self.remat, "loss.impl": self.loss_impl,
                "train.micro_batch_size": self.micro_batch}

    def describe(self) -> str:
        mesh = ",".join(f"{a}={s}" for a, s in self.mesh if s > 1) or "data=1"
        return f"mesh {mesh}, model.remat={self.remat}, loss.impl={self.loss_impl}, " \
               f"train.micro_batch_size={self.micro_batch}"


@dataclasses.dataclass(frozen=True)
class Figures:
    """A compiled step's per-device figures: peak memory (bytes), flops and bytes accessed (XLA's cost analysis)."""
    peak_bytes: float
    flops: float
    bytes_accessed: float

    def at_depth(self, deeper: "Figures", layers: int) -> "Figures":
        """Linear extrapolation from this (1-layer) and `deeper` (2-layer) to `layers` layers."""
        return Figures(*(a + (layers - 1) * (b - a) for a, b in zip(dataclasses.astuple(self),
                                                                     dataclasses.astuple(deeper))))


def compiled_figures(compiled, lowered=None, devices: int = 1) -> Figures:
    """Per-device figures of a compiled step: peak memory (arguments + outputs - donated aliases + temporaries +
    generated code, from `memory_analysis()`), bytes accessed (the compiled program's `cost_analysis()`, a loop's
    body once) and the flops of one run of the whole step: the matmuls of `lowered` (the same step before XLA's
    optimizations, so with the recomputation remat asks for; `hlo_flops.matmul_flops`, loops by their trip counts)
    over its `devices`, or without it the compiled program's count. Why not XLA's: on a GPU the lowered program has
    none and the compiled one leaves out the cuBLAS calls (H200, W4: 1.09 s estimated against 8.3 s measured)."""
    def cost(stage) -> dict:
        analysis = stage.cost_analysis()
        return (analysis[0] if isinstance(analysis, (list, tuple)) else analysis) or {}
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes)
    compiled_cost = cost(compiled)
    flops = matmul_flops(lowered.as_text()) / devices if lowered is not None else compiled_cost.get("flops", 0.0)
    return Figures(float(peak), float(flops), float(compiled_cost.get("bytes accessed", 0.0)))


@dataclasses.dataclass
class Row:
    """A planned candidate: its figures, whether they come from the full-depth compile, and what became of it."""
    candidate: Candidate
    accum: int
    figures: Figures
    est_step_s: float
    full_depth: bool = False
    measured_step_s: float | None = None
    note: str = ""

    @property
    def peak_gb(self) -> float:
        return self.figures.peak_bytes / 1e9


def device_memory_bytes(plan: ConfigDict, device=None) -> int | None:
    """plan.device_memory_gb in bytes, else the device's allocator limit (`memory_stats()["bytes_limit"]`), else
    None (CPUs report no memory)."""
    if plan.device_memory_gb is not None:
        return int(plan.device_memory_gb * 1e9)
    stats = (device or jax.local_devices()[0]).memory_stats() or {}  # memory_stats needs an addressable device
    return stats.get("bytes_limit")


def device_peaks(device_kind: str, peak_tflops_override: float | None = None) -> tuple[float, float, bool]:
    """(peak TFLOP/s, HBM TB/s, known) of one device: `training.metrics.PEAK_TFLOPS` and HBM_TB_PER_S, else
    NOMINAL_PEAKS (known False)."""
    flops = peak_tflops(device_kind, peak_tflops_override)
    bandwidth = next((bw for name, bw in HBM_TB_PER_S if name in device_kind), None)
    if flops is None or bandwidth is None:
        return (*NOMINAL_PEAKS, False)
    return flops, bandwidth, True


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def mesh_factorisations(devices: int, axes: tuple[str, ...]) -> list[tuple[tuple[str, int], ...]]:
    """Every assignment of sizes to `axes` whose product is `devices` (the other MESH_AXES 1), as (axis, size)
    tuples over MESH_AXES."""
    out = []

    def assign(i: int, left: int, sizes: dict) -> None:
        if i == len(axes):
            if left == 1:
                out.append(tuple((a, sizes.get(a, 1)) for a in MESH_AXES))
            return
        for d in divisors(left):
            assign(i + 1, left // d, {**sizes, axes[i]: d})
    assign(0, devices, {})
    return out


class Planner:
    """Compiles candidates of one run (`cfg`, the model at `model_path`, which needs only its config.json) on
    abstract inputs and plans the run for `memory` bytes per device."""

    def __init__(self, cfg, model_path: str, memory: int | None, devices=None):
        check_plan_config(cfg.plan)
        self.cfg, self.memory = cfg, memory
        self.devices = list(devices or jax.devices())
        # Scanned layers compile as one body whatever the depth: no probes, every candidate at full depth.
        self.scan = bool(cfg.model.get("scan_layers"))
        self.hf = read_hf_config(resolve_checkpoint_dir(model_path))
        self.layers = int(self.hf["num_hidden_layers"])
        self.lora = cfg.peft.method == "lora"
        self.zero3 = bool(cfg.mesh.zero3_over_data)
        total = cfg.train.max_steps or 1000  # the schedule's length changes no shape
        self.optimizer, self.schedule = build_optimizer(cfg.optim, max(total, cfg.optim.schedule.warmup_steps + 1))
        tflops, tbps, self.peaks_known = device_peaks(self.devices[0].device_kind, cfg.logging.peak_tflops)
        self.seconds_per_flop, self.seconds_per_byte = 1 / (tflops * 1e12), 1 / (tbps * 1e12)
        self._figures: dict[tuple[Candidate, int], Figures] = {}
        self._compiled: dict[Candidate, tuple] = {}

    @property
    def budget(self) -> float:
        """Bytes per device a plan may use: plan.margin x device memory."""
        return self.cfg.plan.margin * self.memory

    # Candidates ---------------------------------------------------------------------------------------------------
    def own(self) -> Candidate:
        """The run's own settings as a candidate."""
        cfg = self.cfg
        shape = make_mesh({k: v for k, v in cfg.mesh.items() if k != "zero3_over_data"}, self.devices).shape
        return Candidate(tuple((a, int(shape[a])) for a in MESH_AXES), cfg.model.remat, cfg.loss.impl,
                         cfg.train.micro_batch_size)

    def mesh_problem(self, mesh: tuple[tuple[str, int], ...]) -> str | None:
        """Why a mesh cannot run this model and batch (None if it can)."""
        shape = dict(mesh)
        dp = shape["data"] * shape["fsdp"]
        batch = self.cfg.train.global_batch_size
        if batch % dp:
            return f"train.global_batch_size {batch} is not divisible by data x fsdp = {dp}"
        heads = self.hf["num_attention_heads"]
        try:
            check_mesh_fits(shape, num_heads=heads, num_kv_heads=self.hf.get("num_key_value_heads") or heads,
                            seq_len=self.cfg.data.seq_len, batch_rows=dp)
        except MeshConfigError as e:
            return str(e).split(";")[0]
        return None

    def geometry(self, candidate: Candidate) -> tuple[int, int]:
        """(accumulation steps, rows per micro-step over all replicas) of a candidate."""
        rows = candidate.micro_batch * candidate.data_parallel
        return self.cfg.train.global_batch_size // rows, rows

    # Compiling ----------------------------------------------------------------------------------------------------
    def _abstract_model(self, candidate: Candidate, layers: int):
        cfg = self.cfg
        hf = {**self.hf, "num_hidden_layers": layers}
        if isinstance(hf.get("layer_types"), list):
            hf["layer_types"] = hf["layer_types"][:layers]
        cls, model_cfg = family_config(hf, "config.json", dict(remat=candidate.remat, scan_layers=self.scan,
                                                               attention_impl=cfg.model.attention))

        def build():
            model = cls(model_cfg, dtype=jnp.dtype(cfg.model.dtype), param_dtype=jnp.dtype(cfg.model.param_dtype),
                        rngs=nnx.Rngs(0))
            fp8 = cfg.model.fp8
            if fp8.enabled:
                apply_fp8(model, tuple(fp8.filter_modules),
                          amax_history_len=fp8.amax_history_len if fp8.recipe == "delayed" else None)
            if self.lora:
                apply_lora(model, r=cfg.peft.r, alpha=cfg.peft.alpha, dropout=cfg.peft.dropout,
                           target_modules=cfg.peft.target_modules, exclude_modules=cfg.peft.exclude_modules)
            return model
        return nnx.eval_shape(build)

    def lower_args(self, candidate: Candidate, layers: int):
        """(jitted train step, its abstract (state, frozen, batch) arguments with shardings, and the (state, frozen,
        batch) shardings) of a candidate at `layers` decoder layers: the step the recipe's `build_run` makes."""
        cfg = self.cfg
        mesh, rules = make_mesh(candidate.mesh_shape, self.devices), rules_for(self.zero3)
        model = self._abstract_model(candidate, layers)
        graphdef, trainable, frozen = split_model(model, self.lora)
        state_shapes, state_shardings = state_layout(trainable, self.optimizer,
                                                     tree_shardings(model, trainable, mesh, rules),
                                                     amax_histories(model))
        frozen_shardings = tree_shardings(model, frozen, mesh, rules)
        step_kw = dict(loss_impl=candidate.loss_impl, chunk_size=cfg.loss.chunk_size,
                       max_segments=PACKED_MAX_SEGMENTS if cfg.data.packing else 1)
        train, _, batch_3d, _ = compile_steps(
            make_train_step(graphdef, self.optimizer, self.schedule, grad_shardings=state_shardings["params"],
                            **step_kw),
            make_eval_step(graphdef, **step_kw), state_shardings, frozen_shardings, mesh, rules)
        accum, rows = self.geometry(candidate)
        batch = {k: jax.ShapeDtypeStruct((accum, rows, cfg.data.seq_len), jnp.int32, sharding=batch_3d[k])
                 for k in LLM_BATCH}

        def place(shapes, shardings):
            return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
        args = (place(state_shapes, state_shardings), place(frozen, frozen_shardings), batch)
        return train, args, (state_shardings, frozen_shardings, batch_3d)

    def figures(self, candidate: Candidate, layers: int) -> Figures:
        """Figures of the candidate's step compiled at `layers` layers (cached; the full-depth executable is kept
        for timing)."""
        key = (candidate, layers)
        if key not in self._figures:
            log.info("plan: compiling %s at %d layer(s)", candidate.describe(), layers)
            train, args, shardings = self.lower_args(candidate, layers)
            lowered = train.lower(*args)
            compiled = lowered.compile()
            self._figures[key] = compiled_figures(compiled, lowered, len(self.devices))
            if layers == self.layers:
                self._compiled[candidate] = (compiled, args, shardings)
        return self._figures[key]

    def predict(self, candidate: Candidate, full_depth: bool = False) -> Row:
        """The candidate's row: extrapolated from the PROBE_LAYERS compiles, or compiled at full depth (also when
        the model is no deeper than the probes, or `full_depth`)."""
        full = full_depth or self.scan or self.layers <= max(PROBE_LAYERS) or (candidate, self.layers) in self._figures
        if full:
            figures = self.figures(candidate, self.layers)
        else:
            shallow, deeper = (self.figures(candidate, n) for n in PROBE_LAYERS)
            figures = shallow.at_depth(deeper, self.layers)
        accum, _ = self.geometry(candidate)
        est = figures.flops * self.seconds_per_flop + accum * figures.bytes_accessed * self.seconds_per_byte
        return Row(candidate, accum, figures, est, full_depth=full)

    def fits(self, row: Row) -> bool:
        return row.figures.peak_bytes <= self.budget

    # Searching ----------------------------------------------------------------------------------------------------
    def largest_micro_batch(self, mesh, remat: str, loss_impl: str) -> Row:
        """The row of the largest fitting micro-batch (a divisor of the per-replica batch; memory grows with it, so
        bisection), or of the smallest micro-batch when none fits."""
        dp = dict(mesh)["data"] * dict(mesh)["fsdp"]
        options = divisors(self.cfg.train.global_batch_size // dp)
        row_of = functools.lru_cache(None)(lambda i: self.predict(Candidate(mesh, remat, loss_impl, options[i])))
        if not self.fits(row_of(0)):
            return row_of(0)
        lo, hi = 0, len(options) - 1  # options[lo] fits; find the last that does
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.fits(row_of(mid)) else (lo, mid - 1)
        return row_of(lo)

    def candidate_meshes(self) -> list[tuple[tuple[str, int], ...]]:
        """The meshes over plan.mesh_axes that can run the model and batch; PlanError naming why when none can."""
        meshes = mesh_factorisations(len(self.devices), tuple(self.cfg.plan.mesh_axes))
        problems = {m: self.mesh_problem(m) for m in meshes}
        usable = [m for m in meshes if problems[m] is None]
        if not usable:
            axes = ", ".join(self.cfg.plan.mesh_axes)
            raise PlanError(f"no mesh of {len(self.devices)} devices over plan.mesh_axes ({axes}) can run this: "
                            f"{'; '.join(sorted(set(problems.values())))}; change train.global_batch_size, "
                            f"data.seq_len or plan.mesh_axes")
        return usable

    def search(self, verify: bool = True) -> list[Row]:
        """Rows of every (mesh, remat, loss) with its largest fitting micro-batch (and the run's own settings when
        valid), fitting ones first by estimated step time; with `verify`, the best fitting one is compiled at full
        depth and rows that do not fit there are marked and moved down, until one does (`plan_run.nearest_choice`
        verifies the row it names instead)."""
        try:
            own = self.own()
        except MeshConfigError:  # the config's mesh does not fit these devices: the plan chooses one anyway
            own = None
        rows = [self.largest_micro_batch(m, r, impl) for m in self.candidate_meshes()
                for r in self.cfg.plan.remat for impl in self.cfg.plan.loss_impl]
        if own is not None and self.mesh_problem(own.mesh) is None and own not in {row.candidate for row in rows} \
                and self.cfg.train.global_batch_size % (own.micro_batch * own.data_parallel) == 0:
            rows.append(self.predict(own))
        for row in rows:
            if row.candidate == own:
                row.note = "config's own"
        return self._rank(rows, verify)

    def _rank(self, rows: list[Row], verify: bool) -> list[Row]:
        while True:
            rows.sort(key=lambda r: (not self.fits(r), r.est_step_s if self.fits(r) else r.figures.peak_bytes))
            best = rows[0]
            if not verify or not self.fits(best) or best.full_depth:
                return rows
            full = self.predict(best.candidate, full_depth=True)
            full.note = best.note
            rows[0] = full

    def nearest_fitting(self, rows: list[Row], to: Candidate) -> Row | None:
        """The fitting row that changes fewest of `to`'s settings (mesh, remat, loss, micro-batch), then fastest."""
        def changes(c: Candidate) -> int:
            return sum((c.mesh != to.mesh, c.remat != to.remat, c.loss_impl != to.loss_impl,
                        c.micro_batch != to.micro_batch))
        fitting = [r for r in rows if self.fits(r)]
        return min(fitting, key=lambda r: (changes(r.candidate), r.est_step_s), default=None)

    def unsatisfiable(self, rows: list[Row]) -> PlanError:
        smallest = min(rows, key=lambda r: r.figures.peak_bytes)
        fixes = ["more devices", "a smaller data.seq_len or train.global_batch_size"]
        fixes += [] if self.lora else ["LoRA (peft.method=lora)"]
        fixes += [] if set(self.cfg.plan.remat) >= set(REMAT_POLICIES) else ["a longer plan.remat list"]
        return PlanError(f"no candidate fits plan.margin {self.cfg.plan.margin:g} x {self.memory / 1e9:.3g} GB of "
                         f"device memory: the smallest predicted peak is {smallest.peak_gb:.3g} GB per device "
                         f"({smallest.candidate.describe()}); use {', '.join(fixes[:-1])} or {fixes[-1]}")

    # Timing -------------------------------------------------------------------------------------------------------
    def measure(self, candidate: Candidate, steps: int) -> float:
        """Seconds per step of the candidate's full-depth step over `steps` steps after one warm-up step, on
        random-init weights and random tokens (timed before the run's weights are loaded)."""
        self.figures(candidate, self.layers)
        compiled, args, (state_sh, frozen_sh, batch_sh) = self._compiled[candidate]
        vocab = int(self.hf["vocab_size"])

        def random_tree(shapes, key):
            leaves, tree = jax.tree.flatten(shapes)
            keys = jax.random.split(key, len(leaves))
            return tree.unflatten([0.02 * jax.random.normal(k, s.shape, s.dtype)
                                   if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape, s.dtype)
                                   for k, s in zip(keys, leaves)])

        def make_inputs(key):
            state, frozen, batch = args
            state = {**random_tree(state, key), "ok": jnp.bool_(True)}
            ids = jax.random.randint(key, batch["input_ids"].shape, 0, vocab, jnp.int32)
            positions = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
            return state, random_tree(frozen, key), dict(input_ids=ids, labels=ids, segment_ids=jnp.ones_like(ids),
                                                         positions=positions)
        state, frozen, batch = jax.jit(make_inputs, out_shardings=(state_sh, frozen_sh, batch_sh))(
            jax.random.PRNGKey(0))
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        del state, frozen, batch
        return statistics.median(times[1:])

    # Planning -----------------------------------------------------------------------------------------------------
    def plan(self) -> "Plan":
        """Search, optionally time the best TOP_MEASURED fitting rows (plan.measure_steps), and choose; PlanError
        when nothing fits."""
        rows = self.search()
        if not self.fits(rows[0]):
            raise self.unsatisfiable(rows)
        chosen = rows[0]
        steps = self.cfg.plan.measure_steps
        if steps:
            timed = [r for r in rows if self.fits(r)][:TOP_MEASURED]
            for row in timed:
                if not row.full_depth:
                    full = self.predict(row.candidate, full_depth=True)
                    full.note = row.note
                    rows[rows.index(row)] = row = full
                if self.fits(row):
                    row.measured_step_s = self.measure(row.candidate, steps)
            rows = self._rank(rows, verify=True)
            measured = [r for r in rows if r.measured_step_s is not None and self.fits(r)]
            chosen = min(measured, key=lambda r: r.measured_step_s, default=rows[0])
            if jax.process_count() > 1:  # timings differ between processes: process 0's choice holds
                from jax.experimental import multihost_utils
                chosen = rows[int(multihost_utils.broadcast_one_to_all(np.int32(rows.index(chosen))))]
        chosen.note = ("chosen, " + chosen.note) if chosen.note else "chosen"
        for row in rows:
            if not self.fits(row):
                row.note = (row.note + ", " if row.note else "") + "over memory"
        return Plan(rows, chosen, self)


@dataclasses.dataclass
class Plan:
    """The planned rows (best first), the chosen one, and what they were planned for."""
    rows: list[Row]
    chosen: Row
    planner: Planner

    def header(self) -> str:
        p = self.planner
        peaks = "device peaks" if p.peaks_known else f"nominal peaks {NOMINAL_PEAKS[0]:g} TFLOP/s, " \
                                                      f"{NOMINAL_PEAKS[1]:g} TB/s (unknown device: ranking only)"
        measured = f"; measured: {p.cfg.plan.measure_steps} steps with random-init weights" \
            if p.cfg.plan.measure_steps else ""
        return (f"plan for {len(p.devices)} x {p.devices[0].device_kind}: {p.memory / 1e9:.3g} GB per device, "
                f"budget plan.margin {p.cfg.plan.margin:g} = {p.budget / 1e9:.3g} GB; GB/device from the compiled "
                f"step (~: extrapolated from {'/'.join(map(str, PROBE_LAYERS))}-layer compiles); est. from {peaks}"
                f"{measured}")

    def table_rows(self) -> list[list[str]]:
        out = [["mesh", "remat", "loss", "micro x accum", "GB/device", "est. s/step", "measured s/step", ""]]
        for r in self.rows:
            c = r.candidate
            out.append([c.label(), c.remat, c.loss_impl, f"{c.micro_batch} x {r.accum}",
                        f"{'' if r.full_depth else '~'}{r.peak_gb:.3f}", f"{r.est_step_s:.4g}",
                        "-" if r.measured_step_s is None else f"{r.measured_step_s:.4g}", r.note])
        return out

    def table(self) -> str:
        rows = self.table_rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join([self.header()] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                                            for row in rows])

    def markdown(self) -> str:
        rows = self.table_rows()
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "---|" * len(rows[0]))
        return f"# Plan\n\n{self.header()}\n\n" + "\n".join(lines) + "\n"

    def record(self) -> dict:
        p = self.planner
        return dict(key=plan_key(p.cfg, p.devices), chosen=self.chosen.candidate.settings(),
                    device=dict(kind=p.devices[0].device_kind, count=len(p.devices), memory_bytes=p.memory,
                                budget_bytes=p.budget),
                    rows=[dict(settings=r.candidate.settings(), accum=r.accum, peak_bytes=r.figures.peak_bytes,
                               flops=r.figures.flops, bytes_accessed=r.figures.bytes_accessed,
                               est_step_s=r.est_step_s, full_depth=r.full_depth, measured_step_s=r.measured_step_s,
                               note=r.note) for r in self.rows])


def plan_key(cfg, devices) -> dict:
    """What a plan depends on: the model, adapters, data shape, batch, optimizer (not its learning rate or schedule,
    which change no shape), plan section and devices (a resumed run reuses plan.json while these are unchanged)."""
    return json.loads(json.dumps(dict(
        model={k: v for k, v in cfg.model.to_dict().items() if k != "remat"}, peft=cfg.peft.to_dict(),
        seq_len=cfg.data.seq_len, packing=cfg.data.packing, global_batch_size=cfg.train.global_batch_size,
        chunk_size=cfg.loss.chunk_size, optim={k: v for k, v in cfg.optim.to_dict().items() if k not in ("learning_rate", "schedule")},
        plan=cfg.plan.to_dict(),
        zero3_over_data=cfg.mesh.zero3_over_data, devices=[len(devices), devices[0].device_kind])))


def make_plan(cfg, model_path: str, devices=None) -> Plan:
    """The "auto" plan of a run (also what `python -m automodel_jax.plan` prints). PlanError when the device memory
    is unknown (a CPU without plan.device_memory_gb) or nothing fits."""
    devices = list(devices or jax.devices())
    return Planner(cfg, model_path, required_device_memory(cfg.plan), devices).plan()


def required_device_memory(plan: ConfigDict, device=None) -> int:
    """`device_memory_bytes`, or PlanError when the device reports none (a CPU without plan.device_memory_gb): the
    "auto" plan needs it; checked before any model is built."""
    memory = device_memory_bytes(plan, device)
    if memory is None:
        platform = (device or jax.local_devices()[0]).platform
        raise PlanError(f"plan: {platform} devices report no memory size; set plan.device_memory_gb")
    return memory
