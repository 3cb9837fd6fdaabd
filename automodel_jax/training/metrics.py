"""What the user sees while training: a progress bar, metrics.jsonl, TensorBoard, W&B and a loss plot.

Only one process should write (``enabled=False`` on processes other than 0), so every method is a
no-op when disabled. Metric names the progress bar knows: ``loss``, ``learning_rate``,
``grad_norm``, ``tokens_per_sec``; any other metric is still logged everywhere else.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder
from tensorboard.summary import Writer
from tqdm import tqdm

from automodel_jax.config import validate_choice

WANDB_MODES = ("offline", "online")
# metric name -> (label on the progress bar, number format)
_BAR_FIELDS = {
    "loss": ("loss", ".4f"),
    "learning_rate": ("lr", ".2e"),
    "grad_norm": ("gnorm", ".3f"),
    "tokens_per_sec": ("tok/s", ".0f"),
}


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
    ):
        """``run_config`` (e.g. ``cfg.to_dict()``) is stored with the W&B run."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self._bar = self._jsonl = self._tb = self._wandb_run = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if wandb is not None and wandb.enabled:  # first: the likeliest to fail (not installed, bad mode)
            self._wandb_run = _start_wandb(wandb, self.run_dir, run_config)
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
        else:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)

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
        if self._bar is not None:
            self._bar.close()
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
