"""Optimizer and learning-rate schedule of a run, built from the ``optim`` config section.

Weight decay follows each optimizer's usual meaning: ``adamw``, ``lion`` and ``adafactor`` decay
the weights directly (decoupled); ``adam`` and ``sgd`` add ``weight_decay * param`` to the
gradient, like ``torch.optim.Adam``/``SGD``. NeMo Automodel's ``llama3_2_1b_squad_peft`` recipe
(Adam, lr 1e-5, cosine to 1e-6) is ``name="adam", learning_rate=1e-5,
schedule.name="cosine", schedule.min_learning_rate=1e-6``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from automodel_jax.config import ConfigError, validate_choice

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion")
SCHEDULES = ("constant", "linear", "cosine", "wsd")


def optim_defaults() -> ConfigDict:
    """The ``optim`` config section with its defaults."""
    return ConfigDict(
        dict(
            name="adamw",
            learning_rate=1e-5,
            weight_decay=0.0,
            b1=0.9,  # adamw, adam, lion
            b2=0.999,  # adamw, adam, lion (lion's paper uses 0.99)
            eps=1e-8,  # adamw, adam
            momentum=0.9,  # sgd; 0 = plain SGD
            grad_clip=1.0,  # max global gradient norm; 0 = no clipping
            schedule=dict(
                name="constant",
                warmup_steps=0,  # linear warmup from 0 to learning_rate
                min_learning_rate=0.0,  # where linear, cosine and wsd decay end
                decay_fraction=0.1,  # wsd: the last fraction of steps that decays
            ),
        )
    )


def link_min_learning_rate(optim_cfg: ConfigDict, ratio: float) -> None:
    """Ties ``schedule.min_learning_rate`` to ``ratio * learning_rate`` (an ml_collections field reference), so an
    overridden learning rate moves the minimum with it; overriding the minimum itself sets it to a fixed value."""
    optim_cfg.schedule.min_learning_rate = optim_cfg.get_ref("learning_rate") * ratio


def check_schedule(optim_cfg: ConfigDict, total_steps: int | None) -> str:
    """ConfigError naming a bad learning rate or ``schedule`` setting; returns the schedule's name. ``total_steps``
    None: the run's length is not known yet (a run by epochs learns it from its data), and the checks against it are
    left to ``build_schedule``."""
    sched = optim_cfg.schedule
    name = validate_choice(sched, "name", SCHEDULES, prefix="optim.schedule")
    peak, low, warmup = optim_cfg.learning_rate, sched.min_learning_rate, sched.warmup_steps
    known = total_steps is not None
    if known and total_steps < 1:
        raise ConfigError(f"total_steps must be at least 1, got {total_steps}")
    if peak <= 0:
        raise ConfigError(f"optim.learning_rate must be > 0, got {peak}")
    if not 0 <= low <= peak:
        raise ConfigError(f"optim.schedule.min_learning_rate must be in [0, learning_rate={peak}], got {low}")
    if warmup < 0 or (known and warmup >= total_steps and name != "constant"):
        bounds = f"in [0, total_steps={total_steps})" if known else ">= 0"
        fix = ("; lower optim.schedule.warmup_steps or train longer (train.max_steps, train.num_epochs)"
               if known and warmup >= 0 else "")
        raise ConfigError(f"optim.schedule.warmup_steps must be {bounds}, got {warmup}{fix}")
    if name == "wsd":
        if not 0 < sched.decay_fraction <= 1:
            raise ConfigError(f"optim.schedule.decay_fraction must be in (0, 1], got {sched.decay_fraction}")
        stable_steps, decay_steps = _wsd_stable_steps(sched.decay_fraction, total_steps, warmup) if known else (0, 0)
        if stable_steps < 0:
            raise ConfigError(
                f"optim.schedule: warmup_steps={warmup} overlaps the wsd decay of the last {decay_steps} "
                f"steps (total_steps={total_steps}); lower warmup_steps or decay_fraction"
            )
    return name


def build_schedule(optim_cfg: ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: warmup, then constant, linear, cosine or WSD decay to the minimum."""
    name = check_schedule(optim_cfg, total_steps)
    sched = optim_cfg.schedule
    peak, low, warmup = optim_cfg.learning_rate, sched.min_learning_rate, sched.warmup_steps

    decay_steps = total_steps - warmup
    if name == "constant":
        main = optax.constant_schedule(peak)
    elif name == "linear":
        main = optax.linear_schedule(peak, low, decay_steps)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps, alpha=low / peak)
    else:
        main = _wsd_tail(peak, low, sched.decay_fraction, total_steps, warmup)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _wsd_stable_steps(decay_fraction: float, total_steps: int, warmup: int) -> tuple[int, int]:
    """(stable steps, decay steps) of a wsd schedule: the decay is the last ``decay_fraction`` of all steps."""
    decay_steps = max(1, round(decay_fraction * total_steps))
    return total_steps - warmup - decay_steps, decay_steps


def _wsd_tail(peak: float, low: float, decay_fraction: float, total_steps: int, warmup: int) -> optax.Schedule:
    """Stable at ``peak``, then linear decay to ``low`` over the last ``decay_fraction`` of all steps (checked by
    ``check_schedule``)."""
    stable_steps, decay_steps = _wsd_stable_steps(decay_fraction, total_steps, warmup)
    return optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, low, decay_steps)], [stable_steps]
    )


def check_optim_config(optim_cfg: ConfigDict, total_steps: int | None = None) -> None:
    """ConfigError naming a bad ``optim`` setting, before anything is built: everything ``build_optimizer`` checks;
    with ``total_steps`` None (not known yet) the schedule's checks against the run's length are left to it."""
    validate_choice(optim_cfg, "name", OPTIMIZERS, prefix="optim")
    check_schedule(optim_cfg, total_steps)
    if optim_cfg.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip must be >= 0 (0 = off), got {optim_cfg.grad_clip}")


def build_optimizer(
    optim_cfg: ConfigDict,
    total_steps: int,
    decay_mask: Callable[[Any], Any] | Any | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Gradient clipping + the configured optimizer on the configured schedule.

    ``decay_mask``: params -> pytree of bools (or that pytree), True where weight decay applies;
    ``decay_mask_matrices_only`` keeps decay off norms and biases. Returns the transformation and
    the schedule, so the training loop can log the learning rate of each step.
    """
    check_optim_config(optim_cfg, total_steps)
    name = optim_cfg.name
    schedule = build_schedule(optim_cfg, total_steps)

    b1, b2, eps, decay = optim_cfg.b1, optim_cfg.b2, optim_cfg.eps, optim_cfg.weight_decay
    if name == "adamw":
        optimizer = optax.adamw(schedule, b1, b2, eps, weight_decay=decay, mask=decay_mask)
    elif name == "lion":
        optimizer = optax.lion(schedule, b1, b2, weight_decay=decay, mask=decay_mask)
    elif name == "adafactor":
        # Absolute learning rate, as for the other optimizers (not scaled by the parameters' RMS).
        optimizer = optax.adafactor(
            schedule, multiply_by_parameter_scale=False, weight_decay_rate=decay or None, weight_decay_mask=decay_mask
        )
    else:
        if name == "adam":
            optimizer = optax.adam(schedule, b1, b2, eps)
        else:
            optimizer = optax.sgd(schedule, momentum=optim_cfg.momentum or None)
        if decay:
            optimizer = optax.chain(optax.add_decayed_weights(decay, decay_mask), optimizer)

    if optim_cfg.grad_clip:
        optimizer = optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), optimizer)
    return optimizer, schedule


def decay_mask_matrices_only(params: Any) -> Any:
    """Weight decay on matrices (kernels, embeddings) only: norm scales and biases are 1-D."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)
