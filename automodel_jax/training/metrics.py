"""What the user sees while training: a progress bar, metrics.jsonl, TensorBoard, W&B and a loss plot, and the
throughput numbers they show (tokens/s, label tokens/s, per device, MFU, step time, peak device memory).

Only one process should write (``enabled=False`` on processes other than 0), so every method is a
no-op when disabled. Metric names the progress bar knows: ``loss``, ``learning_rate``,
``grad_norm``, ``tokens_per_sec``, ``mfu``, ``peak_memory_gib``; any other metric is still logged everywhere else.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder
from tensorboard.summary import Writer
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from automodel_jax.config import validate_choice

WANDB_MODES = ("offline", "online")
# metric name -> (label on the progress bar, number format)
_BAR_FIELDS = {
    "loss": ("loss", ".4f"),
    "learning_rate": ("lr", ".2e"),
    "grad_norm": ("gnorm", ".3f"),
    "tokens_per_sec": ("tok/s", ".0f"),
    "mfu": ("mfu", ".1%"),
    "peak_memory_gib": ("mem GiB", ".1f"),
}
# Peak dense (no sparsity) bf16 TFLOP/s per device, matched in this order against jax's device_kind (so "H100 PCIe"
# before "H100", "L40S" before "L4"): the vendors' data sheets, except the H200, whose 790 is the bf16 matmul peak
# measured on the project's H200 (its data sheet says 989, as the H100 SXM; BENCHMARKS.md's MFU uses 790 too).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 790.0), ("B200", 2250.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5p", 459.0),
               ("TPU v6 lite", 918.0))


def wandb_defaults() -> ConfigDict:
    """The ``wandb`` config section: off unless ``enabled``; ``offline`` runs sync later with ``wandb sync``."""
    return ConfigDict(dict(enabled=False, project="automodel-jax", name=placeholder(str), mode="offline"))


class MetricsLogger:
    """Sends each logged step to run_dir/metrics.jsonl, TensorBoard (run_dir/tensorboard) and W&B."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        tensorboard: bool,
        wandb: ConfigDict | None,
        total_steps: int,
        run_config: Mapping[str, Any] | None = None,
        resumed_step: int | None = None,
    ):
        """``run_config`` (e.g. ``cfg.to_dict()``) is stored with the W&B run. ``resumed_step``: the checkpoint step a
        resumed run starts from; metrics.jsonl rows of later steps (and its validation rows at that step, which the
        resumed run logs again) are dropped, so each step keeps one row per split: the rerun's."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self._bar = self._redirect = self._jsonl = self._tb = self._wandb_run = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb is not None and wandb.enabled:  # first: the likeliest to fail (not installed, bad mode)
            self._wandb_run = _start_wandb(wandb, self.run_dir, run_config)
        if resumed_step is not None:
            _drop_rows_after(self.run_dir / "metrics.jsonl", resumed_step)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            self._tb = Writer(str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any], split: str) -> None:
        """Records ``metrics`` (numbers, including 0-d arrays) of ``split`` ("train", "val", ...) at ``step``."""
        if not self.enabled:
            return
        values = {name: float(value) for name, value in metrics.items()}
        clash = {"step", "split"} & values.keys()
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved in metrics.jsonl; rename them")
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{split}/{name}", value, step=int(step))
            self._tb.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({f"{split}/{name}": value for name, value in values.items()}, step=int(step))

    def progress(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Moves the progress bar to ``step`` (1-based count of done steps) and shows the known metrics."""
        if not self.enabled:
            return
        shown = {
            label: format(float(metrics[name]), spec) for name, (label, spec) in _BAR_FIELDS.items() if name in metrics
        }
        if self._bar is None:  # started at the first step shown, so a resumed run gets a true ETA
            self._bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True, postfix=shown,
                             mininterval=0.5 if sys.stderr.isatty() else 5.0)  # sparse lines in log files
            self._redirect = logging_redirect_tqdm()  # log records print above the bar, never on its line
            self._redirect.__enter__()
        else:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)

    def end_progress(self) -> None:
        """Ends the progress bar: its last line is written out whole, so what is printed next starts a line."""
        if self._bar is not None:
            self._bar.close()
            self._redirect.__exit__(None, None, None)
        self._bar = None

    def plot_losses(self) -> Path | None:
        """Writes run_dir/loss.png with one loss curve per split; None when no loss was logged yet."""
        if not self.enabled:
            return None
        curves = loss_curves(self.run_dir / "metrics.jsonl")
        if not curves:
            return None
        figure = Figure(figsize=(7, 4), layout="tight")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for split, by_step in curves.items():
            steps = sorted(by_step)
            axes.plot(steps, [by_step[s] for s in steps], marker="o" if len(steps) < 30 else None, label=split)
        axes.set(xlabel="step", ylabel="loss", title=self.run_dir.name)
        axes.grid(alpha=0.3)
        axes.legend()
        out = self.run_dir / "loss.png"
        figure.savefig(out, dpi=120)
        return out

    def close(self) -> None:
        """Flushes and closes everything; safe to call twice."""
        self.end_progress()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
        self._bar = self._jsonl = self._tb = self._wandb_run = None


def loss_curves(metrics_file: Path) -> dict[str, dict[int, float]]:
    """Loss by step for each split in a metrics.jsonl; the latest line wins, so resumed runs stay clean."""
    curves: dict[str, dict[int, float]] = {}
    lines = metrics_file.read_text(encoding="utf-8").splitlines() if metrics_file.exists() else []
    for row in map(json.loads, lines):
        if "loss" in row:
            curves.setdefault(row["split"], {})[row["step"]] = row["loss"]
    return curves


def check_wandb_config(wandb_cfg: ConfigDict) -> None:
    """ConfigError naming a bad `wandb.mode` of an enabled W&B section."""
    if wandb_cfg.enabled:
        validate_choice(wandb_cfg, "mode", WANDB_MODES, prefix="wandb")


def _start_wandb(wandb_cfg: ConfigDict, run_dir: Path, run_config: Mapping[str, Any] | None) -> Any:
    """Starts the W&B run, writing under run_dir/wandb (imported here: W&B is an optional extra)."""
    mode = validate_choice(wandb_cfg, "mode", WANDB_MODES, prefix="wandb")
    try:
        import wandb
    except ImportError:
        raise ImportError("wandb.enabled is set but wandb is not installed: pip install wandb") from None
    return wandb.init(
        project=wandb_cfg.project,
        name=wandb_cfg.name,
        mode=mode,
        dir=str(run_dir),
        config=dict(run_config or {}),
    )


def _drop_rows_after(metrics_file: Path, step: int) -> None:
    """Rewrites metrics.jsonl without its rows of steps after `step` and its validation rows at `step` (atomically)."""
    if not metrics_file.exists():
        return
    lines = metrics_file.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (row := json.loads(line))["step"] < step
            or (row["step"] == step and row["split"] == "train")]
    if len(kept) < len(lines):
        tmp = metrics_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, metrics_file)


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """Peak bf16 TFLOP/s of one device of `device_kind` (jax's name), `override` if given; None when unknown (CPU)."""
    if override is not None:
        return float(override)
    return next((peak for name, peak in PEAK_TFLOPS if name in device_kind), None)


def train_flops_per_token(model, trainable: dict, frozen: dict, seq_len: int) -> float:
    """FLOPs of training on one token (forward and backward), for MFU.

    PaLM's formula (Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, with N the parameters (the embedding table
    only when it is also the output head: a lookup is no matmul), L layers, H attention heads, Q head dimension and
    T = seq_len (no discount for causal masking, sliding windows or packing, as there). The 6 N is 2 N forward, 2 N
    for input gradients and 2 N for weight gradients; frozen weights (the base under LoRA, frozen groups) get no
    weight gradients, so they count 4 N and the trainable ones (the adapters) 6 N. A VLM's vision tower is counted as
    if it ran per token (an over-estimate; its tokens are image patches).
    """
    cfg = model.config

    def count(tree: dict) -> int:
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return sum(int(np.prod(leaf.shape)) for path, leaf in leaves
                   if cfg.tie_word_embeddings or "embed_tokens" not in jax.tree_util.keystr(path))

    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    return 6.0 * count(trainable) + 4.0 * count(frozen) + attention


class Throughput:
    """Throughput of the steps between two log points: tokens/s (non-padding tokens processed), label tokens/s,
    tokens/s per device, MFU (when the device's peak is known), seconds per step and peak device memory (GiB, where
    the backend reports it)."""

    def __init__(self, flops_per_token: float, peak_tflops_per_device: float | None, devices: list):
        self.flops_per_token, self.peak, self.devices = flops_per_token, peak_tflops_per_device, devices
        self.tokens = self.label_tokens = self.steps = 0

    def add(self, metrics: Mapping[str, float]) -> None:
        """Counts one finished step's `tokens` and `label_tokens`."""
        self.tokens += metrics["tokens"]
        self.label_tokens += metrics["label_tokens"]
        self.steps += 1

    def rates(self, seconds: float) -> dict[str, float]:
        """The metrics of the steps added in the last `seconds`; starts counting anew."""
        seconds = max(seconds, 1e-9)
        per_sec = self.tokens / seconds
        out = dict(tokens_per_sec=per_sec, label_tokens_per_sec=self.label_tokens / seconds,
                   tokens_per_sec_per_device=per_sec / len(self.devices), step_time=seconds / max(self.steps, 1))
        if self.peak:
            out["mfu"] = per_sec * self.flops_per_token / (self.peak * 1e12 * len(self.devices))
        stats = [device.memory_stats() for device in self.devices if device.process_index == jax.process_index()]
        peaks = [s["peak_bytes_in_use"] for s in stats if s and "peak_bytes_in_use" in s]
        if peaks:
            out["peak_memory_gib"] = max(peaks) / 2**30
        self.tokens = self.label_tokens = self.steps = 0
        return out
