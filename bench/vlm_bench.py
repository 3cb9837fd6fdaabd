"""Vision-language LoRA training throughput on one GPU: Gemma-3-4B's shape through the VLM recipe's own phases.

The workload of bench/vlm_peer_hf.py (the transformers + PEFT peer): a random-initialised model of
google/gemma-3-4b-it's shape (SigLIP 896 px, 256 soft tokens per image, 34-layer text decoder, 5 local : 1 global),
LoRA r8 alpha 32 on the language model's projections (vision tower and embeddings frozen, the recipe's defaults),
micro batch 8, seq 1024, bf16, AdamW lr 1e-5. The data are real `vlm_chat` rows written to a temporary folder: one
896 px PNG drawn with PIL per row and text filling the row to exactly `seq` tokens, read by a real Gemma3Processor
(the embedded byte-level tokenizer and chat template, image processor at 896 px, 256 image tokens). They go through
`setup` (processor, collation, grain loader, jitted buffer-donating step) and `train_loop` (the loop users run),
timed like bench/train_bench.py: the mean step over `--steps` steps after `--warmup`. One JSON line with
train_bench.py's fields: tokens/s, step time, model TFLOP/s and MFU (the peer's FLOP count), peak device memory,
compile + first step time.

    python bench/vlm_bench.py [--shape gemma3-4b|tiny] [--steps 10] [--warmup 2] [--remat none|full|save_dots]
                              [--micro-batch 8] [--loss chunked]

`--shape tiny` is a smoke test on the CPU (a tiny config and a 32 px processor).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from automodel_jax.data.vlm import encode_rows, load_processor
from automodel_jax.models.base import build_model
from automodel_jax.recipes.vlm.embedded import GEMMA3_CHAT_TEMPLATE, build_tokenizer
from automodel_jax.recipes.vlm.finetune import default_config, setup, train_loop

PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "790"))
ROPE = {"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
        "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)}
# The numbers of bench/vlm_peer_hf.py's SHAPES (keep them in step); token ids come from our processor.
SHAPES = {
    "gemma3-4b": dict(
        text=dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, vocab_size=262208, sliding_window=1024,
                  query_pre_attn_scalar=256, max_position_embeddings=131072),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14, vision_use_head=False),
        mm_tokens_per_image=256, batch=8, seq=1024, workload="V1 gemma3-4b VLM LoRA r8 b8 s1024 896px"),
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512, sliding_window=16, query_pre_attn_scalar=16,
                  max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"]),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    patch_size=8, vision_use_head=False),
        mm_tokens_per_image=4, batch=2, seq=64, workload="smoke: tiny gemma3 VLM LoRA on CPU"),
}
WORDS = ("image", "shape", "colour", "circle", "square", "triangle", "left", "right", "top", "bottom", "large",
         "small", "red", "green", "blue", "yellow", "describe", "the", "a", "of", "and", "near", "above", "below")


def write_processor(directory: Path, image_size: int, image_seq_length: int) -> dict:
    """A real Gemma3Processor in `directory`: the embedded byte-level tokenizer and chat template, the image
    processor at `image_size` px, `image_seq_length` image tokens per image. Returns the token ids the model
    config needs (as embedded.build_processor does for its 64 px processor)."""
    from transformers import Gemma3Processor
    try:
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil as ImageProcessor
    except ImportError:  # transformers without the PIL backend module
        from transformers import Gemma3ImageProcessor as ImageProcessor
    tokenizer = build_tokenizer("gemma3")
    processor = Gemma3Processor(image_processor=ImageProcessor(size={"height": image_size, "width": image_size}),
                                tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                                image_seq_length=image_seq_length)
    processor.save_pretrained(directory)
    vocab = tokenizer.get_vocab()
    return dict(image_token_index=vocab["<image_soft_token>"], boi_token_index=vocab["<start_of_image>"],
                eoi_token_index=vocab["<end_of_image>"], pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
                eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]], vocab_size=len(vocab))


def hf_config(shape: dict, tokens: dict) -> dict:
    """config.json of the shape, from transformers' Gemma3Config (as the peer builds it), with our token ids."""
    import transformers
    from transformers import Gemma3Config, Gemma3TextConfig
    if tokens["vocab_size"] > shape["text"]["vocab_size"]:
        raise ValueError(f"the tokenizer's {tokens['vocab_size']} tokens exceed the shape's vocab_size")
    ids = {k: tokens[k] for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    text = dict(shape["text"], **ids)
    if int(transformers.__version__.split(".")[0]) >= 5:
        text["rope_parameters"] = ROPE
    else:
        text.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                    rope_scaling=dict(rope_type="linear", factor=8.0))
    cfg = Gemma3Config(text_config=Gemma3TextConfig(**text).to_dict(), vision_config=shape["vision"],
                       mm_tokens_per_image=shape["mm_tokens_per_image"], tie_word_embeddings=True,
                       image_token_index=tokens["image_token_index"], boi_token_index=tokens["boi_token_index"],
                       eoi_token_index=tokens["eoi_token_index"]).to_dict()
    cfg["architectures"] = ["Gemma3ForConditionalGeneration"]
    return cfg


def flops_per_step(shape: dict, batch: int, seq: int) -> float:
    """The peer's count (bench/vlm_peer_hf.py): text decoder as peer_hf.py (LoRA), plus the frozen vision tower's
    and projector's forward on `batch` images."""
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


def render_image(size: int, seed: int):
    """A size x size RGB picture: a background gradient and a few filled shapes, deterministic by seed."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(size // 16, size // 4)
        fill = tuple(rng.randrange(256) for _ in range(3))
        box = (x - r, y - r, x + r, y + r)
        kind = rng.choice(("ellipse", "rectangle", "triangle"))
        if kind == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        else:
            getattr(draw, kind)(box, fill=fill)
    return image


def words(rng: random.Random, chars: int) -> str:
    """About `chars` characters of words (exactly `chars`, no leading or trailing space: templates trim)."""
    out = ""
    while len(out) < chars:
        out += rng.choice(WORDS) + " "
    return out[:chars - 1].rstrip().ljust(chars - 1, "x") + "." if chars > 1 else "x"


def write_rows(data_dir: Path, processor, num_rows: int, image_size: int, seq: int) -> Path:
    """`num_rows` vlm_chat rows of exactly `seq` tokens each ("<image>" + question, answer; a quarter of the text in
    the question) with one PNG each, as data_dir/rows.jsonl. The tokenizer is byte-level (one ASCII char = one
    token), so one calibration row gives the text length."""
    (data_dir / "images").mkdir(parents=True)
    rng = random.Random(0)

    def row(i: int, chars: int) -> dict:
        path = data_dir / "images" / f"{i:05d}.png"
        if not path.exists():
            render_image(image_size, i).save(path)
        question = words(rng, max(chars // 4, 2))
        return {"messages": [{"role": "user", "content": "<image>" + question},
                             {"role": "assistant", "content": words(rng, max(chars - len(question), 2))}],
                "images": [str(path.relative_to(data_dir))]}

    probe = 64
    base = len(encode_rows("calibration", processor, [row(0, probe)], 10 ** 6, "error", data_dir)[0]["input_ids"])
    chars = probe + seq - base
    if chars < 4:
        raise ValueError(f"seq {seq} is too short for one image and its chat template ({base - probe} tokens)")
    rows = [row(i, chars) for i in range(num_rows)]
    check = encode_rows("check", processor, rows[:1], seq, "error", data_dir)[0]
    if len(check["input_ids"]) != seq:
        raise ValueError(f"a row came to {len(check['input_ids'])} tokens, not {seq}")
    path = data_dir / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(shape_name: str, micro: int | None, steps: int, warmup: int, remat: str, loss: str) -> dict:
    """The workload through the VLM recipe's `setup` and `train_loop`, timed over `steps` steps after `warmup`."""
    shape = SHAPES[shape_name]
    micro, seq = micro or shape["batch"], shape["seq"]
    root = Path(tempfile.mkdtemp(prefix="vlm_bench-"))
    model_dir, data_dir = root / "model", root / "data"
    tokens = write_processor(model_dir, shape["vision"]["image_size"], shape["mm_tokens_per_image"])
    hf_cfg = hf_config(shape, tokens)
    (model_dir / "config.json").write_text(json.dumps(hf_cfg))
    rows = write_rows(data_dir, load_processor(model_dir), 2 * micro, shape["vision"]["image_size"], seq)

    cfg = default_config()
    cfg.run_dir = str(root / "run")
    cfg.model.update(path=str(model_dir), dtype="bfloat16", param_dtype="bfloat16", remat=remat)
    cfg.peft.update(method="lora", r=8, alpha=32.0, dropout=0.0, target_modules=("*_proj",))
    cfg.data.train.update(kind="vlm_chat", path=str(rows))
    cfg.data.validation.update(kind="vlm_chat", path=str(rows), limit=micro)
    cfg.data.update(seq_len=seq, max_images=1, truncation="error")
    cfg.train.update(global_batch_size=micro, micro_batch_size=micro, max_steps=warmup + steps, val_every=0,
                     log_every=10 ** 9, val_max_samples=micro)
    cfg.optim.update(name="adamw", learning_rate=1e-5, grad_clip=0.0)
    cfg.loss.impl = loss
    cfg.mesh.update(data=1, fsdp=-1)
    cfg.checkpoint.enabled = False
    cfg.export.when = "never"
    cfg.logging.tensorboard = False
    model = build_model(hf_cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=remat)
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
    t0 = time.perf_counter()
    train_loop(run_, until_step=warmup + steps)
    jax.block_until_ready(run_.state)
    step_s = (time.perf_counter() - t0) / steps
    run_.logger.close()
    shutil.rmtree(root, ignore_errors=True)
    tok_s = micro * seq / step_s
    tflops = flops_per_step(shape, micro, seq) / step_s / 1e12
    peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30
    return dict(impl="automodel-jax", workload=shape["workload"], batch=micro, seq=seq, global_batch=micro,
                remat=remat, loss_impl=loss, step_s=round(step_s, 4), tokens_per_s=round(tok_s),
                model_tflops=round(tflops, 1), mfu=round(tflops / PEAK_TFLOPS, 3), peak_mem_gb=round(peak, 1),
                compile_and_first_step_s=round(compile_and_first, 1), setup_s=round(setup_s, 1),
                jax=jax.__version__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gemma3-4b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
    parser.add_argument("--micro-batch", type=int, help="rows per step (default: the shape's, 8 at gemma3-4b)")
    parser.add_argument("--loss", default="chunked", choices=("naive", "chunked", "pallas"))
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles)")
    print(json.dumps(run(args.shape, args.micro_batch, args.steps, args.warmup, args.remat, args.loss)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
