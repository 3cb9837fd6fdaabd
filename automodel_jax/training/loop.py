"""Pieces of the training loop that the recipe calls: global batches, metrics checks, validation, sample generations."""
from __future__ import annotations

import math

import jax
import numpy as np

from automodel_jax.data import make_loader


class TrainingError(RuntimeError):
    """Training cannot go on (for example a non-finite loss); the state of the last good step is kept."""


def global_batch(local: dict[str, np.ndarray], accum: int, shardings: dict) -> dict[str, jax.Array]:
    """This process's [batch, seq] arrays -> global [accum, micro, seq] arrays on the mesh."""
    out = {}
    for key, sharding in shardings.items():
        x = local[key]
        x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, x)
    return out


def check_metrics(metrics: dict, step: int, causes: str = "") -> dict[str, float]:
    """Host values of a finished step's metrics; a non-finite loss or gradient stops training with a clear message
    ending in `causes` (what may have caused it in this run: `nonfinite_causes(cfg)`)."""
    values = jax.device_get(metrics)
    if not bool(values["finite"]):
        raise TrainingError(f"step {step}: loss {float(values['loss'])} / grad norm {float(values['grad_norm'])} is "
                            f"not finite; training stopped with the parameters of the last good step. {causes}")
    return {k: float(v) for k, v in values.items() if k != "finite"}


def nonfinite_causes(cfg) -> str:
    """The likely causes of a non-finite step that apply to this run's settings, as one sentence. (Token ids outside
    the embedding table, which embed as NaN, are refused at start-up, so they are not among them.)"""
    optim, model = cfg.optim, cfg.model
    causes = [f"a learning rate too high for this model (optim.learning_rate={optim.learning_rate:g}: lower it)"]
    if not optim.grad_clip:
        causes.append("no gradient clipping (set optim.grad_clip=1.0)")
    if not optim.schedule.warmup_steps:
        causes.append("no warmup (set optim.schedule.warmup_steps)")
    low = [f"model.{key}={model[key]}" for key in ("dtype", "param_dtype") if model[key] in ("float16", "bfloat16")]
    if low:
        causes.append(f"reduced precision ({', '.join(low)}: try float32)")
    return "Likely causes in this run: " + "; ".join(causes) + "."


def validation_batches(dataset, max_samples: int | None, batch_size: int, seq_len: int, pad_id: int) -> list[dict]:
    """The first `max_samples` validation samples as fixed-shape batches (this process's share), built once."""
    count = len(dataset) if not max_samples else min(max_samples, len(dataset))
    subset = [dataset[i] for i in range(count)]
    per_process = max(batch_size // jax.process_count(), 1)
    loader = make_loader(subset, batch_size=per_process, seq_len=seq_len, pad_id=pad_id, seed=0, shuffle=False,
                         num_epochs=1, shard_index=jax.process_index(), shard_count=jax.process_count(),
                         drop_remainder=False)
    return list(loader)


def validation_loss(eval_step, params, frozen, batches: list[dict], shardings: dict, fp8=None) -> float:
    """Token-weighted mean loss over all validation batches (one device-to-host read at the end); `fp8`: the train
    state's amax histories (delayed FP8 scaling), passed to the eval step when given."""
    sums, counts = [], []
    for batch in batches:
        placed = {k: jax.make_array_from_process_local_data(s, batch[k]) for k, s in shardings.items()}
        loss_sum, count = eval_step(params, frozen, placed, *([] if fp8 is None else [fp8]))
        sums.append(loss_sum)
        counts.append(count)
    total, n = jax.device_get((sum(sums), sum(counts)))
    return float(total) / max(int(n), 1) if n else math.nan


def print_generations(title: str, model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts`, printed under `title` (what a user looks at before and after training)."""
    from automodel_jax.generation import generate
    outputs = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in outputs]
    print(f"--- generations {title} ---", flush=True)
    for prompt, text in zip(prompts, texts):
        print(f"{prompt!r} -> {text!r}", flush=True)
    return texts
