"""Log-likelihood of continuations given contexts, the way lm-evaluation-harness scores multiple-choice tasks.

A request is (context token ids, continuation token ids). Its score is the sum of the log-probabilities the model
gives the continuation tokens after the context, plus whether each of them was the argmax (lm-eval's `is_greedy`).
Inputs longer than the model's context lose tokens on the left, as lm-eval truncates them.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from automodel_jax.generation import bucket_length, context_length
from automodel_jax.models.vocab import check_token_ids


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score_batch(graphdef, state, ids, mask, targets, weights):
    """(sum of weighted target log-probs, every weighted target is the argmax) per row of a right-padded batch."""
    logits = nnx.merge(graphdef, state)(ids, mask, right_padded=True).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprobs = picked - jax.nn.logsumexp(logits, axis=-1)
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return jnp.sum(logprobs * weights, axis=1), jnp.all(greedy, axis=1)


def score_requests(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                   batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood [n] float64, is_greedy [n] bool) of each (context ids, continuation ids) request; ValueError
    for an id outside the model's embedding table.

    Requests are sorted by length so batches pad little; each batch is padded to `batch_size` rows and a bucketed
    length, so a whole evaluation compiles a handful of programs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    vocab_size = model.config.vocab_size
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {i} has an empty {'context' if not context else 'continuation'}: "
                             "score a non-empty continuation after at least one context token (e.g. BOS)")
        outside = [t for t in (*context, *continuation) if not 0 <= t < vocab_size]
        check_token_ids({f"request {i}": outside[0]} if outside else {}, vocab_size,
                        "encode it with the model's own tokenizer")
    max_len = context_length(model)
    graphdef, state = nnx.split(model)
    inputs = [(list(c) + list(x))[-(max_len + 1):] for c, x in requests]
    lengths = [len(x) for _, x in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    loglik, greedy = np.zeros(len(requests)), np.zeros(len(requests), bool)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = bucket_length(max(len(inputs[i]) - 1 for i in chunk))
        ids = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        mask[:, 0] = 1  # filler rows keep one real token so no attention row is empty
        weights = np.zeros((batch_size, width), np.float32)
        for row, i in enumerate(chunk):
            whole = inputs[i]
            n = len(whole) - 1
            ids[row, :n], targets[row, :n], mask[row, :n] = whole[:-1], whole[1:], 1
            weights[row, n - min(lengths[i], n):n] = 1.0
        sums, all_greedy = _score_batch(graphdef, state, ids, mask, targets, weights)
        loglik[chunk] = np.asarray(sums)[:len(chunk)]
        greedy[chunk] = np.asarray(all_greedy)[:len(chunk)]
    return loglik, greedy
