"""A `jax.profiler` trace of chosen training steps, written into the run directory for TensorBoard / Perfetto.

The model's blocks carry `jax.named_scope`s (model / layers.N / self_attn / mlp, vision_tower, ...), so the trace
reads like the model. Config section `profile`: enabled, start_step (first traced step), num_steps, dir (under
run_dir). View with `tensorboard --logdir RUN_DIR/profile` (Profile tab) or open the .trace.json.gz in Perfetto.
"""
from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from automodel_jax.config import ConfigError


def profile_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(enabled=False, start_step=3, num_steps=3, dir="profile"))


class StepProfiler:
    """Starts a trace before step `start_step` and stops it after `num_steps` steps have finished on the device.

    Only this process's devices are traced; with `enabled=False` (or profile.enabled false) every call is a no-op.
    Raises ConfigError for a negative start step or a non-positive step count.
    """

    def __init__(self, cfg, run_dir: Path, *, enabled: bool = True):
        if cfg.start_step < 0 or cfg.num_steps < 1:
            raise ConfigError(f"profile.start_step must be >= 0 and profile.num_steps >= 1 (got {cfg.start_step}, "
                              f"{cfg.num_steps})")
        self.on = bool(cfg.enabled) and enabled
        self.start, self.stop_after = cfg.start_step, cfg.start_step + cfg.num_steps
        self.directory = Path(run_dir) / cfg.dir
        self.active = False

    def before(self, step: int, state) -> None:
        """Call before running `step`: starts the trace at start_step, ends it once the traced steps are done."""
        if not self.on:
            return
        if step == self.start and not self.active:
            jax.block_until_ready(state)  # earlier steps stay out of the trace
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True
        elif step == self.stop_after and self.active:
            self.close(state)

    def close(self, state) -> None:
        """Ends a running trace once `state` is computed (the last traced step has finished)."""
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            print(f"profiler trace of steps {self.start}..{self.stop_after - 1} written to {self.directory}",
                  flush=True)
