"""Training-step throughput on one GPU: the W1-W4 workloads of BENCHMARKS.md with our real train step.

Random-initialised models of the published shapes, mock tokens (loss on every token), the recipe's own jitted,
buffer-donating step. One JSON line per workload: tokens/s, median step time, model TFLOP/s and MFU (the same FLOP
count as the HF peer, ../shared/peers/peer_hf.py), peak device memory, compile time.

    python bench/train_bench.py w1 w2 w3 w4 [--remat save_dots] [--loss chunked] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from automodel_jax import AutoModelForCausalLM
from automodel_jax.parallel.sharding import make_mesh
from automodel_jax.peft.lora import apply_lora
from automodel_jax.training.optim import build_optimizer, optim_defaults
from automodel_jax.training.step import compile_steps, init_state, make_eval_step, make_train_step, split_model, \
    tree_shardings

PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "790"))
SHAPES = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                        max_position_embeddings=131072),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                        max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=256),
}
# name: (shape, lora rank or None, lora alpha, micro batch, seq, global batch)
WORKLOADS = {
    "w1": ("W1 llama3.2-1b LoRA r8 b8 s2048", "llama3.2-1b", 8, 32, 8, 2048, 8),
    "w2": ("W2 llama3.2-1b full-SFT b8 s2048", "llama3.2-1b", None, 0, 8, 2048, 8),
    "w3": ("W3 llama3.1-8b LoRA r8 b4 s2048", "llama3.1-8b", 8, 32, 4, 2048, 4),
    "w4": ("W4 llama3.1-8b LoRA r16 b2 s4096 gbs32", "llama3.1-8b", 16, 32, 2, 4096, 32),
    "smoke": ("smoke: tiny LoRA on CPU", "tiny", 8, 32, 2, 64, 4),
}


def flops_per_token(cfg: dict, seq: int, lora: bool) -> float:
    """The peer's convention: matmul params touched per token, attention counted as full, LoRA = no weight grads."""
    h, layers, f, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    dense = layers * (2 * h * h + 2 * h * kv + 3 * h * f) + h * v
    attn = layers * 2 * seq * h
    fwd = 2 * dense + 2 * attn
    return 3 * fwd if not lora else 2 * fwd + 2 * attn


def run(key: str, steps: int, warmup: int, remat: str, loss: str) -> dict:
    name, shape, rank, alpha, micro, seq, global_batch = WORKLOADS[key]
    lora = rank is not None
    hf_cfg = dict(model_type="llama", **SHAPES[shape])
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=jnp.bfloat16,
                                             param_dtype=jnp.bfloat16 if lora else jnp.float32, remat=remat)
    if lora:
        apply_lora(model, r=rank, alpha=alpha, target_modules=("*_proj",))
    optim_cfg = optim_defaults()
    optim_cfg.update(name="adamw", learning_rate=1e-5, grad_clip=0.0)
    optimizer, schedule = build_optimizer(optim_cfg, 1000)
    mesh = make_mesh()
    graphdef, trainable, frozen = split_model(model, lora)
    state, state_shardings = init_state(trainable, optimizer, 0, tree_shardings(model, trainable, mesh))
    frozen = jax.device_put(frozen, tree_shardings(model, frozen, mesh))
    step_kw = dict(loss_impl=loss, right_padded=True, chunk_size=None)
    train, _, batch_3d, _ = compile_steps(make_train_step(graphdef, optimizer, schedule, **step_kw),
                                          make_eval_step(graphdef, **step_kw), state_shardings,
                                          tree_shardings(model, frozen, mesh), mesh)
    del model, trainable
    accum = global_batch // micro
    rng = np.random.default_rng(0)
    ids = rng.integers(0, hf_cfg["vocab_size"], (accum, micro, seq + 1), dtype=np.int32)
    batch = dict(input_ids=ids[..., :-1], labels=ids[..., 1:], segment_ids=np.ones_like(ids[..., :-1]),
                 positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (accum, micro, seq)).copy())
    batch = jax.device_put(batch, batch_3d)
    t0 = time.perf_counter()
    compiled = train.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        float(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tok_s = global_batch * seq / med
    tflops = tok_s * flops_per_token(hf_cfg, seq, lora) / 1e12
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    return dict(impl="automodel-jax", workload=name, batch=micro, seq=seq, global_batch=global_batch,
                remat=remat, loss_impl=loss, step_s=round(med, 4), tokens_per_s=round(tok_s),
                model_tflops=round(tflops, 1), mfu=round(tflops / PEAK_TFLOPS, 3), peak_mem_gb=round(peak, 1),
                compile_s=round(compile_s, 1), loss=round(float(metrics["loss"]), 3), jax=jax.__version__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="+", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
    parser.add_argument("--loss", default="chunked", choices=("naive", "chunked", "pallas"))
    args = parser.parse_args()
    for key in args.workloads:
        print(json.dumps(run(key, args.steps, args.warmup, args.remat, args.loss)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
