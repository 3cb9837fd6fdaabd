"""GEMM-level FP8 speed-up (issue 16): one Linear's forward and backward (x @ W, dx, dW) at the decoder shapes of a
workload, bf16 `jnp.dot` against `models.fp8.fp8_dot` (E4M3 forward, E5M2 gradients, tensorwise scales computed in
the same function), each jitted alone and timed after warm-up. One JSON line per shape and the FLOP-weighted ratio
over the layer's projections: the ceiling FP8 can give the matmuls of that workload, before attention, norms,
the loss and the optimizer dilute it.

    python bench/fp8_gemm.py [--tokens 8192] [--shape llama3.1-8b] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from automodel_jax.models.fp8 import fp8_dot

from train_bench import SHAPES


def projections(cfg: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of one decoder layer's Linear layers (q/k/v/o, gate/up/down), Llama naming."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return dict(q_proj=(h, h), k_proj=(h, kv), v_proj=(h, kv), o_proj=(h, h), gate_proj=(h, f), up_proj=(h, f),
                down_proj=(f, h))


def seconds(fn, args, iters: int) -> float:
    """Mean wall time of `fn(*args)` over `iters` calls after two warm-up calls (s)."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192, help="rows of x: micro batch x seq (W4: 2 x 4096)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    def fwd_bwd(dot):
        def run(x, w, g):  # y, and dx, dW for the output gradient g: all three GEMMs stay
            y, vjp = jax.vjp(dot, x, w)
            return (y, *vjp(g))
        return jax.jit(run)

    bf16_fn, fp8_fn = fwd_bwd(jnp.dot), fwd_bwd(fp8_dot)
    total = {"bf16": 0.0, "fp8": 0.0}
    key = jax.random.PRNGKey(0)
    for name, (n_in, n_out) in projections(SHAPES[args.shape]).items():
        kx, kw, kg = jax.random.split(jax.random.fold_in(key, n_in * n_out), 3)
        x = jax.random.normal(kx, (args.tokens, n_in), jnp.bfloat16)
        g = jax.random.normal(kg, (args.tokens, n_out), jnp.bfloat16)
        w = (jax.random.normal(kw, (n_in, n_out), jnp.float32) * n_in ** -0.5).astype(jnp.bfloat16)
        flops = 3 * 2 * args.tokens * n_in * n_out  # forward, dx and dW
        row = {"shape": args.shape, "layer": name, "m_k_n": [args.tokens, n_in, n_out]}
        times = {label: seconds(fn, (x, w, g), args.iters) for label, fn in (("bf16", bf16_fn), ("fp8", fp8_fn))}
        for label, s in times.items():
            total[label] += s
            row[f"{label}_tflops"] = round(flops / s / 1e12, 1)
        row["ratio"] = round(times["bf16"] / times["fp8"], 3)
        print(json.dumps(row), flush=True)
    print(json.dumps({"shape": args.shape, "tokens": args.tokens, "layer_fwd_bwd_ratio": round(total["bf16"] /
                                                                                            total["fp8"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
