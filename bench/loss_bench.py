"""Micro-benchmark of linear_cross_entropy: naive vs chunked vs pallas, forward + backward.

Prints one JSON line per run: median milliseconds of loss + gradients w.r.t. hidden and kernel (or hidden only with
--grad hidden, the LoRA case), of the forward alone, the device's peak bytes in use (memory_stats) and XLA's planned
temporary bytes. Each run is a fresh subprocess so that the device's peak memory belongs to that run alone.

    python bench/loss_bench.py                      # N=16384, H=2048, V=128256, bf16 (GPU)
    python bench/loss_bench.py --small              # tiny shapes, runs anywhere (pallas interpreted off-GPU)
    python bench/loss_bench.py --impl pallas --pallas-config 128,256,64,8,8,3 --pallas-config 64,128,64,8,4,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout, without installing the package
    sys.path.insert(0, str(ROOT))
SMALL = {"n": 64, "h": 64, "v": 1000}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help=f"tiny problem {SMALL}, for a smoke test on CPU")
    parser.add_argument("--n", type=int, default=16384, help="tokens")
    parser.add_argument("--h", type=int, default=2048, help="hidden size")
    parser.add_argument("--v", type=int, default=128256, help="vocabulary size")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--impl", action="append", choices=["naive", "chunked", "pallas"],
                        help="implementation to time (repeatable; default: all three)")
    parser.add_argument("--chunk-size", type=int, action="append",
                        help="chunk_size to try: tokens for chunked, vocabulary columns for pallas "
                             "(repeatable; default: the impl's default)")
    parser.add_argument("--pallas-config", action="append", metavar="BN,BV,BK,GROUP,WARPS,STAGES",
                        help="Pallas tile config to try (repeatable; default: the dtype's default)")
    parser.add_argument("--softcap", type=float, default=None, help="logit soft-cap (Gemma 2 uses 30)")
    parser.add_argument("--grad", choices=["both", "hidden"], default="both",
                        help="differentiate w.r.t. hidden and kernel, or hidden only (frozen lm_head, LoRA)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.n, args.h, args.v = SMALL["n"], SMALL["h"], SMALL["v"]
        args.repeats, args.warmup = min(args.repeats, 3), 1
    return args


def _median_ms(fn, args, repeats: int, warmup: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_one(args, impl: str, chunk_size: int | None, config: str | None) -> dict:
    """Time one (impl, chunk_size, config) in this process and return its JSON record."""
    import jax
    import jax.numpy as jnp

    from automodel_jax.kernels.linear_cross_entropy import BlockConfig
    from automodel_jax.losses.cross_entropy import DEFAULT_CHUNK_SIZE, linear_cross_entropy
    from automodel_jax.losses.pallas import pallas_linear_cross_entropy

    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    hidden = jax.random.normal(keys[0], (args.n, args.h), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(keys[1], (args.h, args.v), jnp.float32) * args.h ** -0.5).astype(dtype)
    labels = jax.random.randint(keys[2], (args.n,), 0, args.v)
    labels = jnp.where(jax.random.uniform(keys[3], (args.n,)) < 0.1, -100, labels)  # some prompt tokens ignored

    if impl == "pallas" and config is not None:
        block_config = BlockConfig(*(int(x) for x in config.split(",")))
        size = chunk_size or DEFAULT_CHUNK_SIZE["pallas"]
        loss_fn = lambda h, w: pallas_linear_cross_entropy(  # noqa: E731
            h, w, labels, chunk_size=size, ignore_index=-100, logit_softcap=args.softcap, config=block_config)
    else:
        loss_fn = lambda h, w: linear_cross_entropy(  # noqa: E731
            h, w, labels, impl=impl, chunk_size=chunk_size, logit_softcap=args.softcap)

    def mean_loss(h, w):
        loss_sum, count = loss_fn(h, w)
        return loss_sum / jnp.maximum(count, 1)

    argnums = (0, 1) if args.grad == "both" else 0
    train = jax.jit(jax.value_and_grad(mean_loss, argnums=argnums))
    forward = jax.jit(mean_loss)
    compiled = train.lower(hidden, kernel).compile()
    analysis = compiled.memory_analysis()
    ms = _median_ms(train, (hidden, kernel), args.repeats, args.warmup)
    forward_ms = _median_ms(forward, (hidden, kernel), args.repeats, args.warmup)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "impl": impl, "n": args.n, "h": args.h, "v": args.v, "dtype": args.dtype, "grad": args.grad,
        "softcap": args.softcap, "chunk_size": chunk_size, "pallas_config": config,
        "ms": round(ms, 3), "forward_ms": round(forward_ms, 3),
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "temp_bytes": getattr(analysis, "temp_size_in_bytes", None),
        "loss": float(forward(hidden, kernel)), "backend": jax.default_backend(),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        impl, chunk, config = json.loads(args.worker)
        print(json.dumps(run_one(args, impl, chunk, config)), flush=True)
        return 0
    runs = []
    for impl in args.impl or ["naive", "chunked", "pallas"]:
        chunks = [None] if impl == "naive" else (args.chunk_size or [None])
        configs = (args.pallas_config or [None]) if impl == "pallas" else [None]
        runs += [(impl, chunk, config) for chunk in chunks for config in configs]
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--worker"]
    failures = 0
    for run in runs:
        cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", json.dumps(run)]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if result.returncode == 0:
            print(result.stdout.strip().splitlines()[-1], flush=True)
        else:
            failures += 1
            error = (result.stderr.strip().splitlines() or ["no output"])[-1]
            print(json.dumps({"impl": run[0], "chunk_size": run[1], "pallas_config": run[2], "error": error}),
                  flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
