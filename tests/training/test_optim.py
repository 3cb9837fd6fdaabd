import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from automodel_jax.config import ConfigError
from automodel_jax.training.optim import (
    OPTIMIZERS,
    build_optimizer,
    build_schedule,
    check_optim_config,
    decay_mask_matrices_only,
    optim_defaults,
)


def make_cfg(**fields):
    cfg = optim_defaults()
    schedule = fields.pop("schedule", {})
    cfg.update(fields)
    cfg.schedule.update(schedule)
    return cfg


def quadratic(params):
    return jnp.sum((params["w"] - 1.0) ** 2) + jnp.sum((params["b"] + 2.0) ** 2)


def start_params():
    return {"w": jnp.zeros((3, 4)), "b": jnp.zeros((4,))}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_a_quadratic(name):
    tx, _ = build_optimizer(make_cfg(name=name, learning_rate=0.05, weight_decay=0.01), total_steps=30)
    params = start_params()
    state = tx.init(params)
    start_loss = float(quadratic(params))
    for _ in range(30):
        updates, state = tx.update(jax.grad(quadratic)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(quadratic(params)) < 0.25 * start_loss


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_skips_what_the_mask_excludes(name):
    cfg = make_cfg(name=name, learning_rate=0.1, weight_decay=0.5, grad_clip=0.0)
    tx, _ = build_optimizer(cfg, total_steps=10, decay_mask=decay_mask_matrices_only)
    params = {"w": jnp.full((3, 4), 2.0), "b": jnp.full((4,), 2.0)}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(jnp.abs(updates["w"]).min()) > 0  # decayed towards 0
    assert float(jnp.abs(updates["w"]).max()) < 2.0
    np.testing.assert_array_equal(updates["b"], 0.0)


def test_weight_decay_without_mask_decays_everything():
    tx, _ = build_optimizer(make_cfg(learning_rate=0.1, weight_decay=0.5), total_steps=10)
    params = {"w": jnp.full((3, 4), 2.0), "b": jnp.full((4,), 2.0)}
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["b"], -0.1 * 0.5 * 2.0, rtol=1e-6)  # adamw: -lr * wd * p


def test_decay_mask_works_on_an_nnx_model():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 4, rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)

    model = Tiny(nnx.Rngs(0))
    tx, _ = build_optimizer(make_cfg(learning_rate=0.1, weight_decay=0.5), 10, decay_mask_matrices_only)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = jax.tree.map(lambda p: np.array(p), nnx.state(model, nnx.Param))
    optimizer.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
    after = nnx.state(model, nnx.Param)
    assert not np.allclose(before["linear"]["kernel"], after["linear"]["kernel"][...])
    np.testing.assert_array_equal(before["norm"]["scale"], after["norm"]["scale"][...])
    np.testing.assert_array_equal(before["linear"]["bias"], after["linear"]["bias"][...])


def test_gradient_clipping_clips_the_global_norm():
    cfg = make_cfg(name="sgd", learning_rate=1.0, momentum=0.0, grad_clip=1.0)
    tx, _ = build_optimizer(cfg, total_steps=10)
    params = start_params()
    grads = {"w": jnp.full((3, 4), 3.0), "b": jnp.full((4,), -4.0)}
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = optax.tree.norm(grads)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(updates["w"], -grads["w"] / norm, rtol=1e-5)

    unclipped, _ = build_optimizer(make_cfg(name="sgd", learning_rate=1.0, momentum=0.0, grad_clip=0.0), 10)
    updates, _ = unclipped.update(grads, unclipped.init(params), params)
    np.testing.assert_allclose(updates["b"], 4.0)


def lr_at(cfg, total_steps, steps):
    schedule = build_schedule(cfg, total_steps)
    return [float(schedule(s)) for s in steps]


def test_constant_schedule_with_warmup():
    cfg = make_cfg(learning_rate=1e-3, schedule=dict(name="constant", warmup_steps=10))
    np.testing.assert_allclose(lr_at(cfg, 100, [0, 5, 10, 99, 150]), [0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_linear_schedule():
    cfg = make_cfg(learning_rate=1.0, schedule=dict(name="linear", warmup_steps=10, min_learning_rate=0.1))
    expected = [0.0, 0.5, 1.0, 1.0 - 0.9 * 50 / 100, 0.1, 0.1]
    np.testing.assert_allclose(lr_at(cfg, 110, [0, 5, 10, 60, 110, 200]), expected, rtol=1e-6, atol=1e-7)


def test_cosine_schedule_matches_the_closed_form():
    warmup, total, peak, low = 10, 110, 1.0, 0.1
    cfg = make_cfg(learning_rate=peak, schedule=dict(name="cosine", warmup_steps=warmup, min_learning_rate=low))
    steps = [0, 5, 10, 35, 60, 85, 110, 150]

    def closed_form(s):
        if s < warmup:
            return peak * s / warmup
        progress = min(s - warmup, total - warmup) / (total - warmup)
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress))

    np.testing.assert_allclose(lr_at(cfg, total, steps), [closed_form(s) for s in steps], rtol=1e-5, atol=1e-7)


def test_wsd_schedule_decays_over_the_last_fraction():
    cfg = make_cfg(
        learning_rate=1.0,
        schedule=dict(name="wsd", warmup_steps=10, min_learning_rate=0.0, decay_fraction=0.2),
    )
    # warmup 0..10, stable 10..80, linear decay 80..100
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    np.testing.assert_allclose(lr_at(cfg, 100, [0, 5, 10, 50, 80, 90, 100, 120]), expected, atol=1e-6)


def test_nemo_squad_peft_recipe_is_expressible():
    cfg = make_cfg(name="adam", learning_rate=1e-5, schedule=dict(name="cosine", min_learning_rate=1e-6))
    tx, schedule = build_optimizer(cfg, total_steps=100)
    np.testing.assert_allclose([float(schedule(0)), float(schedule(100))], [1e-5, 1e-6], rtol=1e-5)
    params = start_params()
    updates, _ = tx.update(jax.grad(quadratic)(params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], 1e-5, rtol=1e-3)  # Adam's first step is -lr * sign(grad)


@pytest.mark.parametrize(
    "fields, total_steps, message",
    [
        (dict(name="adamx"), 10,
         "optim.name must be one of 'adamw', 'adam', 'sgd', 'adafactor', 'lion'; got 'adamx'; did you mean 'adam'?"),
        (dict(schedule=dict(name="cosin")), 10,
         "optim.schedule.name must be one of 'constant', 'linear', 'cosine', 'wsd'; got 'cosin'"),
        (dict(), 0, "total_steps must be at least 1, got 0"),
        (dict(learning_rate=0.0), 10, "optim.learning_rate must be > 0, got 0.0"),
        (dict(schedule=dict(min_learning_rate=1.0)), 10, "optim.schedule.min_learning_rate must be in [0, "),
        (dict(schedule=dict(name="cosine", warmup_steps=10)), 10, "optim.schedule.warmup_steps must be in [0, "),
        (dict(schedule=dict(name="wsd", decay_fraction=0.0)), 10, "optim.schedule.decay_fraction must be in (0, 1]"),
        (dict(schedule=dict(name="wsd", warmup_steps=8, decay_fraction=0.5)), 10,
         "optim.schedule: warmup_steps=8 overlaps the wsd decay of the last 5 steps"),
        (dict(grad_clip=-1.0), 10, "optim.grad_clip must be >= 0 (0 = off), got -1.0"),
    ],
)
def test_bad_settings_are_clear_errors(fields, total_steps, message):
    with pytest.raises(ConfigError) as error:
        build_optimizer(make_cfg(**fields), total_steps)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(schedule=dict(name="cosine", warmup_steps=10**6)), None),  # checked once the run's length is known
        (dict(schedule=dict(name="wsd", warmup_steps=10**6, decay_fraction=0.5)), None),
        (dict(schedule=dict(warmup_steps=-1)), "optim.schedule.warmup_steps must be >= 0, got -1"),
        (dict(schedule=dict(name="wsd", decay_fraction=1.5)), "optim.schedule.decay_fraction must be in (0, 1]"),
        (dict(learning_rate=0.0), "optim.learning_rate must be > 0, got 0.0"),
        (dict(name="adamx"), "optim.name must be one of"),
        (dict(grad_clip=-1.0), "optim.grad_clip must be >= 0 (0 = off), got -1.0"),
    ],
)
def test_settings_are_checked_before_the_run_length_is_known(fields, message):
    """check_optim_config without total_steps (a run by epochs): every check that does not need the run's length."""
    cfg = make_cfg(**fields)
    if message is None:
        check_optim_config(cfg)
        with pytest.raises(ConfigError):
            check_optim_config(cfg, 10)
        return
    with pytest.raises(ConfigError) as error:
        check_optim_config(cfg)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
