"""Scanned vs unrolled decoder layers: XLA's memory accounting of the recipe's real train step, compiled on
abstract shapes (the planner's `lower_args`; no weights), on whatever backend jax has (CPU is enough).

    python bench/scan_memory.py [--remat none save_dots full] [--layers 8] [--seq 512] [--batch 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax

from automodel_jax.recipes.llm.finetune import default_config
from automodel_jax.training import plan

HF = dict(model_type="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
          tie_word_embeddings=False)


def config(model_dir: Path, remat: str, scan: bool, batch: int, seq: int, lora: bool = True, loss: str = "chunked"):
    cfg = default_config()
    cfg.run_dir = str(model_dir / "run")
    cfg.model.update(path=str(model_dir), dtype="bfloat16", param_dtype="bfloat16" if lora else "float32",
                     remat=remat, scan_layers=scan)
    cfg.peft.update(method="lora" if lora else "none", r=8, alpha=32.0, target_modules=("*_proj",))
    cfg.data.seq_len = seq
    cfg.train.update(global_batch_size=batch, micro_batch_size=batch, max_steps=10)
    cfg.optim.update(name="adamw", learning_rate=1e-5, grad_clip=0.0)
    cfg.loss.impl = loss
    cfg.mesh.update(data=1, fsdp=-1)
    cfg.plan.mode = "off"
    return cfg


def compile_step(cfg, model_dir: Path):
    planner = plan.Planner(cfg, str(model_dir), memory=None, devices=jax.devices()[:1])
    train, args, _ = planner.lower_args(planner.own(), planner.layers)
    t0 = time.perf_counter()
    lowered = train.lower(*args)
    compiled = lowered.compile()
    return lowered, compiled, time.perf_counter() - t0


def figures(compiled) -> dict:
    m = compiled.memory_analysis()
    return dict(temp_mb=round(m.temp_size_in_bytes / 2**20, 1), arg_mb=round(m.argument_size_in_bytes / 2**20, 1),
                out_mb=round(m.output_size_in_bytes / 2**20, 1), alias_mb=round(m.alias_size_in_bytes / 2**20, 1),
                peak_mb=round(plan.compiled_figures(compiled).peak_bytes / 2**20, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remat", nargs="+", default=["none", "save_dots", "full"])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--full-sft", action="store_true")
    parser.add_argument("--dump", help="write each compiled HLO text under this directory")
    args = parser.parse_args()
    model_dir = Path(tempfile.mkdtemp(prefix="scan_memory-"))
    (model_dir / "config.json").write_text(json.dumps({**HF, "num_hidden_layers": args.layers}))
    for remat in args.remat:
        row = dict(remat=remat)
        for scan in (False, True):
            cfg = config(model_dir, remat, scan, args.batch, args.seq, lora=not args.full_sft)
            lowered, compiled, secs = compile_step(cfg, model_dir)
            name = "scan" if scan else "unrolled"
            row[name] = dict(**figures(compiled), compile_s=round(secs, 1))
            if args.dump:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                (Path(args.dump) / f"{remat}-{name}.hlo").write_text(compiled.as_text())
        row["temp_ratio"] = round(row["scan"]["temp_mb"] / row["unrolled"]["temp_mb"], 3)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
