"""Benchmarks a fine-tuned model can be scored on: HellaSwag (log-likelihood ranking) and SQuAD (greedy answers).

`evaluate` is the one entry point, for the CLI (`python -m automodel_jax.evaluate`) and for recipes at the end of
training.
"""
from __future__ import annotations

from automodel_jax.evaluation import hellaswag, squad

# Where each task's rows come from by default: (Hub dataset, split).
DEFAULT_DATA = {"hellaswag": ("Rowan/hellaswag", "validation"), "squad": ("rajpurkar/squad", "validation")}
TASKS = tuple(DEFAULT_DATA)


def evaluate(model, tokenizer, task: str, rows, limit: int | None = None, batch_size: int = 8, *,
             max_new_tokens: int = 32) -> dict:
    """Score `model` on the first `limit` of `rows` (dicts, or a `datasets.Dataset`) of `task`.

    Returns {"task", "samples"} plus `acc` and `acc_norm` (hellaswag) or `exact_match` and `f1` (squad), as fractions.
    `max_new_tokens` bounds SQuAD answers.
    """
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; choose one of {TASKS}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    if limit is not None and limit < 1:
        raise ValueError(f"limit {limit} must be a positive number of rows (or None for all)")
    rows = [rows[i] for i in range(len(rows) if limit is None else min(limit, len(rows)))]
    if not rows:
        raise ValueError(f"no rows to evaluate {task} on")
    if task == "hellaswag":
        result = hellaswag.metrics(hellaswag.score(model, tokenizer, rows, batch_size=batch_size))
    else:
        result = squad.metrics(squad.score(model, tokenizer, rows, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens))
    return {"task": task, "samples": len(rows), **result}
