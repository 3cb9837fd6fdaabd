"""Training-step throughput on one GPU: the W1-W4 workloads of BENCHMARKS.md with our real train step.

Random-initialised models of the published shapes and mock tokens (loss on every token), run through the recipe's
own phases (`setup`, `train_loop`: the grain loader, the jitted buffer-donating step, metrics one step behind), so
it measures the loop users run. One JSON line per workload: tokens/s, mean step time, model TFLOP/s and MFU (the same
FLOP count as the HF peer, ../shared/peers/peer_hf.py), peak device memory, compile + first step time.

    python bench/train_bench.py w1 w2 w3 w4 [--remat save_dots] [--loss chunked] [--steps 10] [--profile DIR]
        [--fp8 [--fp8-recipe {tensorwise,delayed}] [--fp8-filter MODULE ...]]

`--plan` (issue 17): the run planner (`plan=auto`, `automodel_jax.training.plan`) chooses remat, loss and micro-batch
before the model is built; its table goes to stderr, and the JSON line adds the chosen settings and the predicted peak
per device beside the measured one (`memory_stats()["peak_bytes_in_use"]`; run one workload per process, the peak is
the process's). `s8` is a Llama-3.1-8B full SFT (bf16 parameters, AdamW) that does not fit an H200 without
activation checkpointing at its micro-batch of 4 (at 1 it does: 86 GiB); `s8l` (seq 8192, micro-batch 1) does not
fit without it at all; `--micro-batch N` hand-tunes against the planner's choice:

    python bench/train_bench.py s8l --plan --steps 3 --warmup 1
    python bench/train_bench.py s8l --remat full --steps 3 --warmup 1

`--fp8` (issue 16): the decoder's Linear layers in FP8 (model.fp8; emulated on CPU), with tensorwise (current) or
delayed (amax history, Transformer Engine's default length 1024) scaling by `--fp8-recipe`.

`packing` (issue 14): Llama-3.2-1B shape LoRA on real SQuAD rows (answer-only loss) tokenized by `--tokenizer`
(stories260K's 512-piece SentencePiece: median 523 tokens a row), seq 1024, global batch 64, micro batch 8, run
padded and then packed; one JSON line each (step time, label tokens/s, non-padding tokens/s) and one with the ratios:

    python bench/train_bench.py packing --data ../shared/assets/data/squad/validation.jsonl \
        --tokenizer ../shared/assets/models/stories260K
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from transformers import AutoTokenizer

from automodel_jax import AutoModelForCausalLM
from automodel_jax.config.cache import enable_compilation_cache
from automodel_jax.data import IGNORE
from automodel_jax.recipes.llm.embedded import build_tokenizer
from automodel_jax.recipes.llm.finetune import default_config, setup, train_loop
from automodel_jax.training.plan import make_plan
from automodel_jax.training.plan_run import apply_settings

PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "790"))
ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
SHAPES = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                        max_position_embeddings=131072),
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                        max_position_embeddings=131072),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=1024),
}
# name: (shape, lora rank or None, lora alpha, micro batch, seq, global batch)
WORKLOADS = {
    "w1": ("W1 llama3.2-1b LoRA r8 b8 s2048", "llama3.2-1b", 8, 32, 8, 2048, 8),
    "w2": ("W2 llama3.2-1b full-SFT b8 s2048", "llama3.2-1b", None, 0, 8, 2048, 8),
    "w3": ("W3 llama3.1-8b LoRA r8 b4 s2048", "llama3.1-8b", 8, 32, 4, 2048, 4),
    "w4": ("W4 llama3.1-8b LoRA r16 b2 s4096 gbs32", "llama3.1-8b", 16, 32, 2, 4096, 32),
    "s8": ("S8 llama3.1-8b full-SFT bf16 params b4 s2048 gbs16", "llama3.1-8b", None, 0, 4, 2048, 16),
    "s8l": ("S8L llama3.1-8b full-SFT bf16 params b1 s8192 gbs8", "llama3.1-8b", None, 0, 1, 8192, 8),
    "smoke": ("smoke: tiny LoRA on CPU", "tiny", 8, 32, 2, 64, 4),
    "packing": ("P1 llama3.2-1b LoRA r8 b8 s1024 gbs64 SQuAD", "llama3.2-1b", 8, 32, 8, 1024, 64),
    "packing_smoke": ("smoke: tiny LoRA on SQuAD rows on CPU", "tiny", 8, 32, 2, 1024, 8),
}
# Full-SFT workloads whose master weights are bf16 (the others: fp32 for full SFT, bf16 for LoRA).
BF16_PARAMS = ("s8", "s8l")
# Workloads on real rows (--data, --tokenizer), run padded and packed.
REAL_DATA = ("packing", "packing_smoke")


def flops_per_token(cfg: dict, seq: int, lora: bool) -> float:
    """The peer's convention: matmul params touched per token, attention counted as full, LoRA = no weight grads."""
    h, layers, f, v = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    dense = layers * (2 * h * h + 2 * h * kv + 3 * h * f) + h * v
    attn = layers * 2 * seq * h
    fwd = 2 * dense + 2 * attn
    return 3 * fwd if not lora else 2 * fwd + 2 * attn


def label_tokens(loader, position: dict, steps: int) -> tuple[int, int]:
    """(label tokens, non-padding tokens) of the `steps` global batches the loader gives from `position` on."""
    loader.set_state(position)
    batches = [next(loader) for _ in range(steps)]
    return (sum(int((b["labels"] != IGNORE).sum()) for b in batches),
            sum(int((b["segment_ids"] != 0).sum()) for b in batches))


def run(key: str, steps: int, warmup: int, remat: str, loss: str, profile: str | None = None,
        data: str | None = None, tokenizer: str | None = None, packing: bool = False, fp8: bool = False,
        fp8_recipe: str = "tensorwise", fp8_filter: tuple[str, ...] = (), plan_auto: bool = False,
        micro_batch: int | None = None, scan_layers: bool = False) -> dict:
    """One workload through the recipe's own phases: `setup` (state, jitted steps, grain loader of mock rows, or of
    the SQuAD rows in `data` tokenized by the HF tokenizer folder `tokenizer`, packed or not) and `train_loop` (the
    loop users run, metrics read one step behind), timed over `steps` steps after `warmup`.
    `profile`: a directory for a `jax.profiler` trace of two steps after warm-up (the recipe's `profile` section).
    `plan_auto`: remat, loss and micro-batch from the run planner instead of `remat`, `loss` and the workload's.
    `micro_batch`: rows per micro-step instead of the workload's (hand-tuning against the planner).
    `scan_layers`: the decoder layers as one stacked module under a scan (model.scan_layers)."""
    name, shape, rank, alpha, micro, seq, global_batch = WORKLOADS[key]
    micro = micro_batch or micro
    lora = rank is not None
    hf_cfg = dict(model_type="llama", **SHAPES[shape])
    model_dir = Path(tempfile.mkdtemp(prefix="train_bench-"))
    (model_dir / "config.json").write_text(json.dumps(hf_cfg))
    # The mock rows need only a pad id; real rows are tokenized by `tokenizer`.
    (build_tokenizer() if data is None else AutoTokenizer.from_pretrained(tokenizer)).save_pretrained(model_dir)
    cfg = default_config()
    cfg.run_dir = str(model_dir / "run")
    param_dtype = "bfloat16" if lora or key in BF16_PARAMS else "float32"
    cfg.model.update(path=str(model_dir), dtype="bfloat16", param_dtype=param_dtype, remat=remat,
                     scan_layers=scan_layers)
    cfg.model.fp8.update(enabled=fp8, recipe=fp8_recipe, filter_modules=tuple(fp8_filter),
                         emulate=fp8)  # emulate matters on CPU only
    cfg.peft.update(method="lora" if lora else "none", r=rank or 8, alpha=float(alpha), target_modules=("*_proj",))
    for split in ("train", "validation"):
        if data is None:
            cfg.data[split].update(kind="mock", vocab_size=hf_cfg["vocab_size"], num_samples=global_batch * 4)
        else:
            cfg.data[split].update(kind="squad", path=str(Path(data).absolute()), split="train")
    cfg.data.update(seq_len=seq, packing=packing)
    cfg.train.update(global_batch_size=global_batch, micro_batch_size=micro, max_steps=warmup + steps, val_every=0,
                     log_every=10 ** 9, val_max_samples=micro)
    cfg.optim.update(name="adamw", learning_rate=1e-5, grad_clip=0.0)
    cfg.loss.impl = loss
    cfg.mesh.update(data=1, fsdp=-1)
    cfg.checkpoint.enabled = False
    cfg.export.when = "never"
    cfg.logging.tensorboard = False
    if profile:
        trace_dir = Path(profile).absolute() / (key + "-packed" * packing)
        cfg.profile.update(enabled=True, start_step=warmup, num_steps=2, dir=str(trace_dir))
    # The run's own settings are the benchmark's: no plan=check probes, so the train step's compile is timed alone.
    cfg.plan.mode = "off"
    planned = None
    if plan_auto:
        cfg.plan.mode = "auto"
        planned = make_plan(cfg, str(model_dir))
        print(planned.table(), file=sys.stderr, flush=True)
        apply_settings(cfg, planned.chosen.candidate.settings())
        cfg.plan.mode = "off"  # planned; the model is built with the choice below
        remat, loss, micro = cfg.model.remat, cfg.loss.impl, cfg.train.micro_batch_size
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=jnp.bfloat16, param_dtype=jnp.dtype(param_dtype),
                                             remat=remat, scan_layers=scan_layers)
    t0 = time.perf_counter()
    run_ = setup(cfg, model=model)
    setup_s = time.perf_counter() - t0
    del model
    t0 = time.perf_counter()
    train_loop(run_, until_step=1)  # compiles ahead of time, then one step
    jax.block_until_ready(run_.state)
    compile_and_first = time.perf_counter() - t0
    train_loop(run_, until_step=warmup)
    jax.block_until_ready(run_.state)
    position = run_.loader.get_state()
    t0 = time.perf_counter()
    train_loop(run_, until_step=warmup + steps)
    jax.block_until_ready(run_.state)
    step_s = (time.perf_counter() - t0) / steps
    labels, real = label_tokens(run_.loader, position, steps)
    run_.logger.close()
    shutil.rmtree(model_dir, ignore_errors=True)
    tok_s = global_batch * seq / step_s
    tflops = tok_s * flops_per_token(hf_cfg, seq, lora) / 1e12
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    result = dict(impl="automodel-jax", workload=name, batch=micro, seq=seq, global_batch=global_batch,
                  remat=remat, scan_layers=scan_layers, loss_impl=loss, packing=packing, fp8=fp8, fp8_recipe=fp8_recipe if fp8 else None,
                  fp8_filter=list(fp8_filter),
                  step_s=round(step_s, 4), tokens_per_s=round(tok_s),
                  label_tokens_per_s=round(labels / steps / step_s), real_tokens_per_s=round(real / steps / step_s),
                  model_tflops=round(tflops, 1), mfu=round(tflops / PEAK_TFLOPS, 3), peak_mem_gb=round(peak, 1),
                  setup_s=round(setup_s, 1), compile_and_first_step_s=round(compile_and_first, 1),
                  jax=jax.__version__)
    if planned is not None:  # the planner's figures beside the measured peak_mem_gb (GiB both)
        result.update(plan_predicted_peak_gb=round(planned.chosen.figures.peak_bytes / 2**30, 1),
                      plan_est_step_s=round(planned.chosen.est_step_s, 4),
                      plan_device_memory_gb=round(planned.planner.memory / 2**30, 1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="+", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
    parser.add_argument("--loss", default="chunked", choices=("naive", "chunked", "pallas"))
    parser.add_argument("--fp8", action="store_true", help="FP8 matmuls in the decoder's Linear layers")
    parser.add_argument("--fp8-recipe", choices=("tensorwise", "delayed"),
                        help="FP8 scaling with --fp8: current per-tensor amax (default), or the amax history's maximum")
    parser.add_argument("--fp8-filter", nargs="+", metavar="MODULE",
                        help="with --fp8: modules kept in bf16 (model.fp8.filter_modules patterns, e.g. k_proj v_proj)")
    parser.add_argument("--plan", action="store_true",
                        help="remat, loss and micro-batch chosen by the run planner (plan=auto) instead of --remat, "
                             "--loss and the workload's micro-batch")
    parser.add_argument("--micro-batch", type=int, help="rows per micro-step instead of the workload's (a divisor of "
                                                            "its global batch)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="the decoder layers as one stacked module under a scan (model.scan_layers)")
    parser.add_argument("--profile", help="write a jax.profiler trace of two timed steps under DIR/WORKLOAD")
    parser.add_argument("--compilation-cache", metavar="DIR",
                        help="JAX's persistent compilation cache in DIR, as the commands use it (a second run shows "
                             "the compile time of a rerun); default: off, every run compiles")
    parser.add_argument("--data", default=str(ASSETS / "data/squad/validation.jsonl"),
                        help="SQuAD rows (JSON lines, rajpurkar/squad schema) for the real-data workloads")
    parser.add_argument("--tokenizer", default=str(ASSETS / "models/stories260K"),
                        help="HF tokenizer folder for the real-data workloads")
    args = parser.parse_args()
    for flag, value in (("--fp8-recipe", args.fp8_recipe), ("--fp8-filter", " ".join(args.fp8_filter or ()))):
        if value and not args.fp8:
            parser.error(f"{flag} {value} needs --fp8 (FP8 matmuls are off without it)")
    fp8 = dict(fp8=args.fp8, fp8_recipe=args.fp8_recipe or "tensorwise", fp8_filter=tuple(args.fp8_filter or ()))
    enable_compilation_cache(bool(args.compilation_cache), args.compilation_cache)
    for key in args.workloads:
        if key not in REAL_DATA:
            print(json.dumps(run(key, args.steps, args.warmup, args.remat, args.loss, args.profile, **fp8,
                                 plan_auto=args.plan, micro_batch=args.micro_batch,
                                 scan_layers=args.scan_layers)), flush=True)
            continue
        for name, path in (("--data", args.data), ("--tokenizer", args.tokenizer)):
            if not Path(path).exists():
                parser.error(f"{name} {path} does not exist; pass the SQuAD JSON lines file and a tokenizer folder")
        rows = []
        for packing in (False, True):
            rows.append(run(key, args.steps, args.warmup, args.remat, args.loss, args.profile, data=args.data,
                            tokenizer=args.tokenizer, packing=packing, **fp8))
            print(json.dumps(rows[-1]), flush=True)
        padded, packed = rows
        step_ratio = packed["step_s"] / padded["step_s"]
        label_ratio = packed["label_tokens_per_s"] / padded["label_tokens_per_s"]
        print(json.dumps(dict(workload=packed["workload"], packed_over_padded_step_s=round(step_ratio, 3),
                              packed_over_padded_label_tokens_per_s=round(label_ratio, 3),
                              targets_met=step_ratio <= 1.1 and label_ratio >= 1.4)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
