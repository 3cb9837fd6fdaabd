"""Attention forward + backward on packed rows, each fused option against the one we use (issue 14, point 1).

Llama-3.2-1B attention shape (32 query heads, 8 key/value heads, head dim 64), bf16, micro batch 8 x seq 1024, rows
first-fit packed with samples of 150-900 tokens (SQuAD-like) and padded at the end. One JSON line per implementation:
mean ms of one jitted forward + backward (dq, dk, dv), and the largest difference of its real-token outputs from ours.

- `ours`: automodel_jax's `attention` with `max_segments` (cuDNN, ragged offsets).
- `cudnn_mask`: `jax.nn.dot_product_attention(implementation="cudnn")` with the dense [B, 1, T, T] boolean mask.
- `pallas_mha`: `jax.experimental.pallas.ops.gpu.attention.mha` with segment ids (keys/values repeated per head).
- `xla`: our XLA path ([B, K, G, T, T] float32 scores).

    python bench/attention_bench.py [--iters 20] [--batch 8] [--seq 1024]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from automodel_jax.models.attention import AttentionInputs, attention, attention_mask

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 64


def packed_rows(batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """(segment ids, positions, most samples in a row) of `batch` rows first-fit packed with samples of 15%-88% of
    `seq` tokens (150-900 at seq 1024), drawn until 64 per row have been tried."""
    rng = np.random.default_rng(seed)
    segments, positions = np.zeros((batch, seq), np.int32), np.zeros((batch, seq), np.int32)
    free, count = np.full(batch, seq), np.zeros(batch, int)
    for _ in range(64 * batch):  # a stream of samples, each into the first row with room (skipped if none has)
        n = int(rng.integers(int(0.15 * seq), int(0.88 * seq)))
        fits = np.flatnonzero(free >= n)
        if not len(fits):
            continue
        row = fits[0]
        start = seq - free[row]
        count[row] += 1
        segments[row, start:start + n], positions[row, start:start + n] = count[row], np.arange(n)
        free[row] -= n
    return segments, positions, int(count.max())


def implementations(segments, positions, most: int) -> dict:
    inputs = AttentionInputs(jnp.asarray(segments), jnp.asarray(positions), max_segments=most)
    mask = attention_mask(inputs.segment_ids, inputs.segment_ids, inputs.positions, inputs.positions)
    impls = {"ours": lambda q, k, v: attention(q, k, v, inputs, impl="auto"),
             "cudnn_mask": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn"),
             "xla": lambda q, k, v: attention(q, k, v, inputs, impl="xla")}
    try:
        from jax.experimental.pallas.ops.gpu.attention import mha
    except ImportError as error:  # removed from jax
        print(json.dumps(dict(impl="pallas_mha", error=str(error))), flush=True)
    else:
        groups = HEADS // KV_HEADS
        impls["pallas_mha"] = lambda q, k, v: mha(q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2),
                                                  inputs.segment_ids, sm_scale=HEAD_DIM ** -0.5, causal=True)
    return impls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    segments, positions, most = packed_rows(args.batch, args.seq)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (args.batch, args.seq, HEADS, HEAD_DIM), jnp.bfloat16)
    k, v = (jax.random.normal(key, (args.batch, args.seq, KV_HEADS, HEAD_DIM), jnp.bfloat16) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
    real = segments != 0
    reference = None
    for name, fn in implementations(segments, positions, most).items():
        def step(q, k, v, fn=fn):
            out, pullback = jax.vjp(fn, q, k, v)
            return out, pullback(cotangent)
        try:
            step = jax.jit(step)
            out, grads = jax.block_until_ready(step(q, k, v))
            for _ in range(2):
                jax.block_until_ready(step(q, k, v))
            t0 = time.perf_counter()
            for _ in range(args.iters):
                out, grads = step(q, k, v)
            jax.block_until_ready((out, grads))
            ms = (time.perf_counter() - t0) / args.iters * 1e3
        except Exception as error:  # an option this jax/GPU cannot run: say so and go on with the others
            print(json.dumps(dict(impl=name, error=f"{type(error).__name__}: {error}"[:300])), flush=True)
            continue
        out = np.asarray(out, np.float32)[real]
        reference = out if reference is None else reference
        print(json.dumps(dict(impl=name, fwd_bwd_ms=round(ms, 3), samples_per_row_max=most,
                              max_abs_diff_vs_ours=float(np.max(np.abs(out - reference))),
                              jax=jax.__version__, device=jax.devices()[0].device_kind)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
