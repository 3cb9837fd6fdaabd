"""Load speed and host memory of the streaming HF loader (issue 6, point 6).

Writes an HF checkpoint of the given shape with random bf16 weights in N safetensors shards (with our own streaming
writer), reads the files once to time plain I/O, then loads them with `AutoModelForCausalLM.from_pretrained` onto the
default device and reports seconds, the ratio to the plain read, and the host's peak RSS growth during the load
against the largest tensor (issue 14's target: under 2 GB plus the largest tensor, `within_target`). The backend is
started before the load and its own resident memory reported apart (`backend_init_gb`: CUDA and XLA libraries, the
same for any use of the device). On a CPU the "device" memory is the host's own, so there the growth beyond the
loaded model's bytes is what the loader holds (`peak_rss_growth_over_model_gb`, the one compared with the target).

The first run in a directory only writes the checkpoint; the next one measures (the peak RSS is the process's own).

    python bench/load_bench.py --shape llama3.1-8b --dir /tmp/ckpt8b --shards 4      # on the GPU machine
    python bench/load_bench.py --shape llama3.1-8b --layers 2 --dir /tmp/ckpt8b2     # CPU: 2.9 GB, largest 1 GB
    python bench/load_bench.py --shape tiny --dir /tmp/ckpt_tiny --shards 2          # anywhere
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import SHAPES  # noqa: E402

from automodel_jax import AutoModelForCausalLM  # noqa: E402
from automodel_jax.checkpoint.safetensors_io import write_file  # noqa: E402


def hf_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def write_checkpoint(cfg: dict, directory: Path, shards: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(cfg)
    total = sum(math.prod(s) * 2 for _, s in tensors)
    groups, current, size = [], [], 0
    for name, shape in tensors:
        current.append((name, shape))
        size += math.prod(shape) * 2
        if size >= total / shards and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
    groups.append(current)
    rng = np.random.default_rng(0)
    weight_map, files = {}, []
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        # random bf16 bit patterns with exponents of small magnitudes: realistic bytes, no NaN or inf
        write_file(directory / fname, [(n, s, np.dtype(ml_dtypes.bfloat16)) for n, s in group],
                   lambda n, shapes=dict(group): rng.integers(0x3a00, 0x3d80, shapes[n], dtype=np.uint16)
                   .view(ml_dtypes.bfloat16))
        weight_map.update({n: fname for n, _ in group})
        files.append(directory / fname)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(dict(model_type="llama", torch_dtype="bfloat16", **cfg)))
    return files


def resident_bytes() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, help="override the shape's number of layers (a smaller checkpoint)")
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    cfg = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    files = sorted(args.dir.glob("model-*.safetensors"))
    if not files:  # writing holds a tensor too, and the peak RSS is the process's: measure on the next run
        write_checkpoint(cfg, args.dir, args.shards)
        print(f"wrote the checkpoint to {args.dir}; run the same command again to measure the load", flush=True)
        return 0
    largest = max(math.prod(s) * 2 for _, s in hf_tensors(cfg))
    t0 = time.perf_counter()
    read = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(64 << 20):
                read += len(chunk)
    read_s = time.perf_counter() - t0
    before_backend = resident_bytes()
    device = jax.devices()[0]
    jax.device_put(np.zeros(8, np.float32), device).block_until_ready()
    rss_before = resident_bytes()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype="bfloat16", param_dtype="bfloat16")  # placed
    load_s = time.perf_counter() - t0
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    held = growth - model_bytes if device.platform == "cpu" else growth  # on a CPU the model itself is host memory
    gib = 2 ** 30
    result = dict(shape=args.shape, layers=cfg["num_hidden_layers"], gb=round(read / 1e9, 2), files=len(files),
                  read_s=round(read_s, 2), load_s=round(load_s, 2), load_over_read=round(load_s / read_s, 2),
                  peak_rss_growth_gb=round(growth / gib, 2), largest_tensor_gb=round(largest / gib, 2),
                  backend_init_gb=round((rss_before - before_backend) / gib, 2),
                  within_target=bool(held < 2 * gib + largest), device=str(device))
    if device.platform == "cpu":
        result["peak_rss_growth_over_model_gb"] = round(held / gib, 2)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
