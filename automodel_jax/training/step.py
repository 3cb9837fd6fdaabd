"""The train and eval steps: one jitted, buffer-donating function each, over explicit pytrees with declared shardings.

State = {"step", "params" (the trainable pytree: adapters for LoRA, everything for SFT), "opt_state", "rng", "ok"},
plus "fp8" (the FP8 layers' amax histories, replicated) in runs with delayed FP8 scaling; the frozen base parameters
travel separately and are never donated. "ok" (bool) turns False at the first non-finite step, and from then on every
step leaves the state as it was: the host reads metrics a step behind, so when it finds the bad step the state is
still that of the last good one, with its step count ("ok" is never checkpointed).

Loss follows NeMo Automodel: token losses summed over labels != -100 and divided by the number of such tokens in the
whole global batch (all micro-batches).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from automodel_jax.losses.cross_entropy import linear_cross_entropy
from automodel_jax.models.attention import AttentionInputs
from automodel_jax.models.params import flatten
from automodel_jax.parallel.sharding import (DEFAULT_RULES, activation_sharding, shardings_like_params,
                                             with_sharding_rules)

BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")
# Per-token arrays [batch, seq]; a VLM's other inputs (pixel values, image masks, vision index arrays) are per image
# or per patch and shard over the batch axis only.
TOKEN_KEYS = BATCH_KEYS + ("token_type_ids",)
# Per-row ranks (without the batch axis) of an LLM batch; a VLM batch adds its model inputs (pixel_values, ...).
LLM_BATCH = {key: 1 for key in BATCH_KEYS}


def batch_axes(key: str, rank: int) -> tuple[str | None, ...]:
    """Logical axes of one batch array of per-row rank `rank`: TOKEN_KEYS are [batch, seq]; M-RoPE positions
    [batch, 3, seq]; everything else (pixel values, image masks, vision index arrays) is sharded over the batch axis
    only."""
    if rank == 1 and key in TOKEN_KEYS:
        return ("batch", "seq")
    if key == "positions" and rank == 2:
        return ("batch", None, "seq")
    return ("batch",) + (None,) * rank


def token_loss(graphdef, trainable, frozen, batch, *, loss_impl: str, max_segments: int | None, dropout_rng=None,
               chunk_size: int | None = None, fp8=None):
    """(sum of token losses, number of label tokens) of one micro-batch.

    `max_segments`: the rows' layout promise for fused attention (1 = right-padded; see `AttentionInputs`).
    `fp8`: the amax histories of a model with delayed FP8 scaling (`layers.amax_histories`), None otherwise.

    Keys beyond BATCH_KEYS (a VLM's pixel_values, token_type_ids, ...) go to the model's `hidden_states` by name.
    """
    model = nnx.merge(graphdef, trainable, frozen, *([] if fp8 is None else [fp8]))
    inputs = AttentionInputs(batch["segment_ids"], batch["positions"], dropout_rng, max_segments=max_segments)
    extra = {k: v for k, v in batch.items() if k not in BATCH_KEYS}
    hidden, kernel = model.output_head(model.hidden_states(batch["input_ids"], inputs, **extra), dropout_rng)
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), kernel, batch["labels"].reshape(-1),
                                impl=loss_impl, chunk_size=chunk_size,
                                logit_softcap=getattr(model, "logit_softcap", None))


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule: Callable, *, loss_impl: str,
                    max_segments: int | None, chunk_size: int | None = None, grad_shardings=None):
    """step(state, frozen, batch) -> (state, metrics); batch arrays are [accum, micro_batch, seq].

    Gradients of the summed loss are accumulated over micro-batches with a scan, then divided by the global token
    count; `grad_shardings` (the trainable parameters' shardings) keeps the accumulators sharded like the parameters
    (FSDP) instead of leaving the scan carry's layout to the compiler. A non-finite loss or gradient (or an earlier
    one: state["ok"] False) leaves the state unchanged (the last good state) and sets metrics["finite"] to False so
    the host can stop with a clear message. With state["fp8"] (delayed FP8 scaling) every micro-batch reads the same
    amax histories and returns them rolled with its amaxes as their "gradient" (`models.fp8.fp8_dot_delayed`); the new
    histories are the elementwise maximum over micro-batches (one roll per optimizer step, holding the step's largest
    amaxes). Metrics: loss, grad_norm, learning_rate, label_tokens (tokens with a label) and tokens (non-padding
    tokens processed) of the global batch, finite.
    """
    def like_params(tree):
        return tree if grad_shardings is None else jax.lax.with_sharding_constraint(tree, grad_shardings)

    def step(state, frozen, batch):
        rng, step_rng = jax.random.split(state["rng"])

        def micro(carry, xs):
            grads_acc, fp8_acc, loss_acc, count_acc = carry
            micro_batch, i = xs
            grad_fn = jax.value_and_grad(
                lambda p, h: token_loss(graphdef, p, frozen, micro_batch, loss_impl=loss_impl, chunk_size=chunk_size,
                                        max_segments=max_segments, dropout_rng=jax.random.fold_in(step_rng, i),
                                        fp8=h),
                argnums=(0, 1), has_aux=True)
            (loss_sum, count), (grads, fp8_new) = grad_fn(state["params"], state.get("fp8"))
            grads_acc = like_params(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads))
            fp8_acc = jax.tree.map(jnp.maximum, fp8_acc, fp8_new)
            return (grads_acc, fp8_acc, loss_acc + loss_sum, count_acc + count), None

        zeros = like_params(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"]))
        fp8_zeros = jax.tree.map(jnp.zeros_like, state.get("fp8"))  # amaxes are >= 0: max(0, a) = a
        accum = batch["input_ids"].shape[0]
        (grads, fp8, loss_sum, count), _ = jax.lax.scan(
            micro, (zeros, fp8_zeros, jnp.float32(0), jnp.int32(0)), (batch, jnp.arange(accum)))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state["params"])
        loss = loss_sum / denom
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = state["ok"] & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = dict(step=state["step"] + 1, params=params, opt_state=opt_state, rng=rng, ok=finite)
        if "fp8" in state:
            new["fp8"] = fp8
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {**state, "ok": finite})
        metrics = dict(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state["step"]), label_tokens=count,
                       tokens=jnp.sum(batch["segment_ids"] > 0, dtype=jnp.int32), finite=finite)
        return new, metrics

    return step


def make_eval_step(graphdef, *, loss_impl: str, max_segments: int | None, chunk_size: int | None = None):
    """eval(trainable, frozen, batch [batch, seq], fp8=None) -> (loss sum, token count); `fp8`: state["fp8"] of a
    run with delayed FP8 scaling, only read (the scales come from the histories; nothing is recorded)."""
    def evaluate(trainable, frozen, batch, fp8=None):
        return token_loss(graphdef, trainable, frozen, batch, loss_impl=loss_impl, max_segments=max_segments,
                          chunk_size=chunk_size, fp8=fp8)
    return evaluate


def _fresh_scalars(seed):
    return jnp.int32(0), jax.random.PRNGKey(seed), jnp.bool_(True)


def state_layout(params: dict, optimizer: optax.GradientTransformation, param_shardings_tree, fp8=None):
    """(shapes, shardings) of the train state for `params` (arrays or jax.ShapeDtypeStruct leaves; nothing is
    allocated): optimizer moments get their parameters' shardings (ZeRO-style when params are sharded), the step, rng
    and ok flag are replicated, and so are `fp8`'s amax histories (delayed FP8 scaling, `layers.amax_histories`;
    None or {} for none) in state["fp8"]. `init_state` builds this state; the planner (training/plan.py) compiles
    against it."""
    mesh = jax.tree.leaves(param_shardings_tree)[0].mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = shardings_like_params(opt_shapes, flatten(params), flatten(param_shardings_tree), mesh)
    step, rng, ok = jax.eval_shape(_fresh_scalars, 0)
    shapes = dict(step=step, params=jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params),
                  opt_state=opt_shapes, rng=rng, ok=ok)
    shardings = dict(step=replicated, params=param_shardings_tree, opt_state=opt_shardings, rng=replicated,
                     ok=replicated)
    if fp8:
        shapes["fp8"] = jax.tree.map(lambda h: jax.ShapeDtypeStruct(h.shape, h.dtype), fp8)
        shardings["fp8"] = jax.tree.map(lambda _: replicated, fp8)
    return shapes, shardings


def init_state(params: dict, optimizer: optax.GradientTransformation, seed: int, param_shardings_tree, fp8=None):
    """Fresh train state on the mesh with the shardings of `state_layout`, the optimizer moments created in place by
    a jitted init with those output shardings; `fp8`: the amax histories of delayed FP8 scaling, or None."""
    _, shardings = state_layout(params, optimizer, param_shardings_tree, fp8)
    params = jax.device_put(params, param_shardings_tree)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(params)
    replicated = shardings["step"]
    scalars = jax.jit(_fresh_scalars, static_argnums=0, out_shardings=(replicated,) * 3)(seed)
    state = dict(step=scalars[0], params=params, opt_state=opt_state, rng=scalars[1], ok=scalars[2])
    if fp8:
        state["fp8"] = jax.device_put(fp8, shardings["fp8"])
    return state, shardings


def compile_steps(train_step, eval_step, state_shardings, frozen_shardings, mesh, rules=DEFAULT_RULES,
                  batch_ranks: dict[str, int] | None = None):
    """jit with declared shardings: state donated, batch arrays sharded by `batch_axes` through the rule table
    (`batch_ranks`: key -> per-row rank, default the LLM batch); the steps are traced inside
    `sharding_rules(mesh, rules)` so the model's activation constraints apply. With state_shardings["fp8"] (delayed
    FP8 scaling) the eval step takes the amax histories as a fourth argument."""
    train_step, eval_step = with_sharding_rules(train_step, mesh, rules), with_sharding_rules(eval_step, mesh, rules)
    ranks = LLM_BATCH if batch_ranks is None else batch_ranks
    batch_3d = {k: activation_sharding(mesh, (None,) + batch_axes(k, r), rules) for k, r in ranks.items()}
    batch_2d = {k: activation_sharding(mesh, batch_axes(k, r), rules) for k, r in ranks.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    train = jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch_3d),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    fp8 = (state_shardings["fp8"],) if "fp8" in state_shardings else ()
    evaluate = jax.jit(eval_step, in_shardings=(state_shardings["params"], frozen_shardings, batch_2d, *fp8),
                       out_shardings=(replicated, replicated))
    return train, evaluate, batch_3d, batch_2d
