"""Peer baseline for vision-language LoRA: transformers' Gemma3ForConditionalGeneration + PEFT on one GPU.

A random-initialised model of google/gemma-3-4b-it's shape (bf16 weights, sdpa attention), LoRA r8 alpha 32 on the
language model's q/k/v/o/gate/up/down projections (vision tower, projector and embeddings frozen, as PEFT leaves
every base weight), fused AdamW lr 1e-5 over the adapters. The batch is the one bench/vlm_bench.py feeds our recipe:
rows of `seq` tokens, each with one image block (<start_of_image>, mm_tokens_per_image image tokens,
<end_of_image>) and token_type_ids marking the image tokens (bidirectional attention within the image, as in
training), pixel_values [batch, 3, image_size, image_size] bf16, labels = input_ids with -100 on the image block.
Step time is the median over `--steps` steps after `--warmup`; peak memory is torch.cuda.max_memory_allocated().
One JSON line, like ../shared/peers/peer_hf.py.

    python bench/vlm_peer_hf.py [--shape gemma3-4b|tiny] [--steps 10] [--warmup 2] [--micro-batch 8]

`--shape tiny` runs a tiny config on the CPU (a smoke test). Options of bench/vlm_bench.py that only concern our
implementation (--remat, --loss) are accepted and ignored, so one argument list drives both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "790"))  # measured bf16 dense matmul on the H200
LORA_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
ROPE = {"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
        "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)}
# Keep in step with bench/vlm_bench.py's SHAPES (the same numbers; our side overrides the token ids with its
# processor's, which changes no shape).
SHAPES = {
    "gemma3-4b": dict(
        text=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                  query_pre_attn_scalar=256, max_position_embeddings=131072),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=256, tokens=dict(boi_token_index=255_999, eoi_token_index=256_000,
                                             image_token_index=262_144),
        batch=8, seq=1024, workload="V1 gemma3-4b VLM LoRA r8 b8 s1024 896px"),
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, sliding_window=16, query_pre_attn_scalar=16,
                  max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"]),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8, vision_use_head=False),
        mm_tokens_per_image=4, tokens=dict(boi_token_index=509, eoi_token_index=510, image_token_index=511),
        batch=2, seq=64, workload="smoke: tiny gemma3 VLM LoRA on CPU"),
}


def hf_config(shape: dict) -> Gemma3Config:
    """transformers' Gemma3Config of a SHAPES entry (rope: local 10k, global 1M linear x8; 5 local : 1 global)."""
    text = dict(shape["text"])
    if int(transformers.__version__.split(".")[0]) >= 5:
        text["rope_parameters"] = ROPE
    else:  # transformers 4: flat rope fields
        text.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                    rope_scaling=dict(rope_type="linear", factor=8.0))
    return Gemma3Config(text_config=Gemma3TextConfig(**text).to_dict(), vision_config=shape["vision"],
                        mm_tokens_per_image=shape["mm_tokens_per_image"], tie_word_embeddings=True,
                        **shape["tokens"])


def flops_per_step(shape: dict, batch: int, seq: int) -> float:
    """Model FLOPs of one LoRA step, peer_hf.py's convention for the text decoder (matmul parameters touched per
    token, attention counted as full, LoRA = forward + input-gradient backward) plus the frozen vision tower's and
    projector's forward on `batch` images."""
    t, v = shape["text"], shape["vision"]
    h, layers, f, vocab = t["hidden_size"], t["num_hidden_layers"], t["intermediate_size"], t["vocab_size"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    dense = layers * (2 * h * q + 2 * h * kv + 3 * h * f) + h * vocab
    attn = layers * 2 * seq * q
    fwd = 2 * dense + 2 * attn
    text = batch * seq * (2 * fwd + 2 * attn)
    hv, patches = v["hidden_size"], (v["image_size"] // v["patch_size"]) ** 2
    layer = 2 * patches * (4 * hv * hv + 2 * hv * v["intermediate_size"]) + 4 * patches * patches * hv
    vision = (v["num_hidden_layers"] * layer + 2 * patches * 3 * v["patch_size"] ** 2 * hv
              + 2 * shape["mm_tokens_per_image"] * hv * h)
    return text + batch * vision


def make_batch(shape: dict, batch: int, seq: int, device) -> dict:
    """Rows of random text tokens around one image block each, as the processor lays them out (BOS first)."""
    tok, k = shape["tokens"], shape["mm_tokens_per_image"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(tok["boi_token_index"], shape["text"]["vocab_size"]), (batch, seq), generator=gen)
    ids[:, 0] = 2  # <bos>
    start = 16
    ids[:, start] = tok["boi_token_index"]
    ids[:, start + 1:start + 1 + k] = tok["image_token_index"]
    ids[:, start + 1 + k] = tok["eoi_token_index"]
    token_type_ids = (ids == tok["image_token_index"]).long()
    labels = ids.masked_fill((token_type_ids == 1) | (ids == tok["boi_token_index"]) | (ids == tok["eoi_token_index"]),
                             -100)
    size = shape["vision"]["image_size"]
    pixels = torch.rand((batch, 3, size, size), generator=gen) * 2 - 1
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                token_type_ids=token_type_ids.to(device), pixel_values=pixels.to(device, torch.bfloat16),
                labels=labels.to(device))


def run(shape_name: str, batch: int | None, steps: int, warmup: int, grad_ckpt: bool, lora_r: int = 8,
        lora_alpha: int = 32) -> dict:
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    batch, seq = batch or shape["batch"], shape["seq"]
    cuda = torch.cuda.is_available() and shape_name != "tiny"
    device = torch.device("cuda" if cuda else "cpu")
    cfg = hf_config(shape)
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = "sdpa"
    with device:  # as peer_hf.py: initialise in float32, keep bf16 weights (peak memory is reset after)
        model = Gemma3ForConditionalGeneration(cfg).to(torch.bfloat16)
    if grad_ckpt:
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS))
    adapted = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    want = shape["text"]["num_hidden_layers"] * 7
    if adapted != want:
        raise RuntimeError(f"LoRA adapted {adapted} modules, expected {want} (7 per language-model layer)")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=cuda)
    model.train()
    inputs = make_batch(shape, batch, seq, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**inputs, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    med = statistics.median(timed)
    tok_s = batch * seq / med
    tflops = flops_per_step(shape, batch, seq) / med / 1e12
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return dict(peer="hf-transformers+peft", workload=shape["workload"], batch=batch, seq=seq,
                lora=dict(r=lora_r, alpha=lora_alpha, dropout=0.0), grad_ckpt=grad_ckpt,
                attn=model.base_model.model.config.text_config._attn_implementation,
                step_s=round(med, 4), step_mean_s=round(statistics.mean(timed), 4), tokens_per_s=round(tok_s),
                model_tflops=round(tflops, 1), mfu=round(tflops / PEAK_TFLOPS, 3), peak_mem_gb=round(peak, 1),
                first_step_s=round(times[0], 1), loss=round(out.loss.item(), 3), trainable_params=sum(
                    p.numel() for p in params), torch=torch.__version__, transformers=transformers.__version__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gemma3-4b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, help="rows per step (default: the shape's, 8 at gemma3-4b)")
    parser.add_argument("--grad-ckpt", action="store_true", help="transformers' gradient checkpointing")
    args, ignored = parser.parse_known_args()
    if ignored:
        print(f"vlm_peer_hf: ignoring {ignored} (options of our benchmark)", file=sys.stderr)
    print(json.dumps(run(args.shape, args.micro_batch, args.steps, args.warmup, args.grad_ckpt)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
