"""The embedded VLM default, minus the weights: real transformers processors and a rendered visual task (no network).

`build_processor("gemma3" | "qwen2_5_vl", directory)` writes a real Gemma3Processor / Qwen2_5_VLProcessor: the
model's image processor at a small size, a byte-level fast tokenizer (every UTF-8 text round-trips; no merges, so a
token is a byte) with the model's special tokens, and a chat template in the style of the model's own. It returns the
vocabulary size and the special token ids a matching tiny model config must use.

`embedded:shapes/{pretrain,pretrain-validation,train,validation}` are conversation rows over 112 x 112 images of
simple shapes drawn with PIL, deterministic by seed. The pre-training splits ask single-skill questions (colour,
shape, count, position); the fine-tuning splits ask NEW instructions that combine those skills ("Say the colour and
place of the shape." -> "red, top left", "Count the squares and name their colour." -> "3 blue"). Validation
scenes (shape, colour, place, size, offset) never occur in any training split, so validation measures what
fine-tuning really learned.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from automodel_jax.config.cache import cache_dir as project_cache_dir
from automodel_jax.data.vlm import (has_torchvision, load_processor, processor_model_type,
                                    qwen_images_only_processor_class)

SCHEME = "embedded:"
TASK_NAME = "shapes"

# ---------------------------------------------------------------------------------------------------------------------
# Processors

GEMMA3_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>")
QWEN2_5_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")

# Gemma 3's layout: BOS, then <start_of_turn>{user|model}\n ... <end_of_turn>\n per turn (assistant -> "model"), a
# leading system message folded into the first user turn, text trimmed, each image as <start_of_image> (the processor
# expands it to the full image sequence).
GEMMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set system = messages[0]['content'] -%}"
    "{%- else -%}{%- set system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- set prefix = system | trim + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('roles must alternate user/assistant after an optional system message') -}}{%- endif -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' -}}"
    "{%- if loop.first -%}{{- prefix -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

# Qwen2.5-VL's layout: a default system turn unless one is given, <|im_start|>{role}\n ... <|im_end|>\n per turn, each
# image as <|vision_start|><|image_pad|><|vision_end|> (the processor repeats <|image_pad|> once per merged patch).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

GEMMA3_IMAGE = dict(image_size=64, image_seq_length=4)  # 4 soft tokens = 2 x 2 after pooling: one per quadrant
# The full 112 px canvas: 8 x 8 patches, 4 x 4 merged tokens, 2 x 2 per quadrant. At 56 px (one token per quadrant)
# a triangle's colour blurred into white and was learnt for 3 of 21 held-out triangles (87.5% in all); at 112 px 100%.
QWEN2_5_VL_IMAGE = dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=112 * 112,
                        max_pixels=112 * 112)  # = CANVAS


def build_tokenizer(model_type: str):
    """A byte-level fast tokenizer: the model's special tokens first (ids 0..), then one token per byte, no merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = {"gemma3": GEMMA3_SPECIALS, "qwen2_5_vl": QWEN2_5_VL_SPECIALS}.get(model_type)
    if specials is None:
        raise ValueError(f"unknown VLM model type {model_type!r}: use 'gemma3' or 'qwen2_5_vl'")
    vocab = {tok: i for i, tok in enumerate(list(specials) + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>" if model_type == "gemma3" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if model_type == "gemma3":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
            extra_special_tokens=dict(boi_token="<start_of_image>", eoi_token="<end_of_image>",
                                      image_token="<image_soft_token>", sot_token="<start_of_turn>",
                                      eot_token="<end_of_turn>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=dict(image_token="<|image_pad|>", video_token="<|video_pad|>",
                                  vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>"))


def _save_qwen(processor, directory: Path) -> None:
    """Save as a Qwen2_5_VLProcessor (class name in the configs) plus the video processor settings it needs."""
    processor.save_pretrained(directory)
    config_file = directory / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["processor_class"] = "Qwen2_5_VLProcessor"
    image = config["image_processor"]
    config.setdefault("video_processor", dict(
        video_processor_type="Qwen2VLVideoProcessor", patch_size=image["patch_size"],
        temporal_patch_size=image["temporal_patch_size"], merge_size=image["merge_size"], size=image["size"],
        image_mean=image["image_mean"], image_std=image["image_std"], do_convert_rgb=True))
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    tok_file = directory / "tokenizer_config.json"
    tok_config = json.loads(tok_file.read_text())
    if "processor_class" in tok_config:
        tok_config["processor_class"] = "Qwen2_5_VLProcessor"
        tok_file.write_text(json.dumps(tok_config, indent=2) + "\n")


def build_processor(model_type: str, directory: str | Path) -> dict:
    """Write a real processor for `model_type` ("gemma3" | "qwen2_5_vl") to `directory`; reload and check it.

    Returns what a matching model config needs: vocab_size, pad/eos/bos token ids and the image token ids (Gemma 3:
    image_token_index, boi_token_index, eoi_token_index, mm_tokens_per_image, image_size; Qwen2.5-VL: image_token_id,
    video_token_id, vision_start_token_id, vision_end_token_id, patch_size, temporal_patch_size, spatial_merge_size,
    patch_dim, min_pixels, max_pixels). Without torchvision the Qwen2.5-VL processor has no video processor (images
    work the same). Raises ValueError for an unknown model type or a processor that fails its reload check.
    """
    directory = Path(directory)
    tokenizer = build_tokenizer(model_type)
    vocab = tokenizer.get_vocab()
    if model_type == "gemma3":
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
        size = GEMMA3_IMAGE["image_size"]
        processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": size, "width": size}),
                                    tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                                    image_seq_length=GEMMA3_IMAGE["image_seq_length"])
        processor.save_pretrained(directory)
        info = dict(image_token_index=vocab["<image_soft_token>"], boi_token_index=vocab["<start_of_image>"],
                    eoi_token_index=vocab["<end_of_image>"], mm_tokens_per_image=GEMMA3_IMAGE["image_seq_length"],
                    image_size=size, bos_token_id=vocab["<bos>"], eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]],
                    pad_token_id=vocab["<pad>"])
    elif model_type == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        q = QWEN2_5_VL_IMAGE
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=q["min_pixels"], max_pixels=q["max_pixels"], patch_size=q["patch_size"],
            temporal_patch_size=q["temporal_patch_size"], merge_size=q["merge_size"])
        if has_torchvision():  # pragma: no cover - this project's CI has no torchvision
            from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor
            processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            video_processor=Qwen2VLVideoProcessor(),
                                            chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
        else:
            processor = qwen_images_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                                  chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
        _save_qwen(processor, directory)
        info = dict(image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
                    vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
                    patch_size=q["patch_size"], temporal_patch_size=q["temporal_patch_size"],
                    spatial_merge_size=q["merge_size"], patch_dim=3 * q["temporal_patch_size"] * q["patch_size"] ** 2,
                    min_pixels=q["min_pixels"], max_pixels=q["max_pixels"], bos_token_id=None,
                    eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"])
    else:
        raise ValueError(f"unknown VLM model type {model_type!r}: use 'gemma3' or 'qwen2_5_vl'")
    info = dict(model_type=model_type, vocab_size=len(vocab), **info)
    check_processor(directory, info)
    return info


def check_processor(directory: str | Path, info: dict) -> None:
    """Reload `directory` and check that one image in a chat becomes the expected number of image tokens."""
    from PIL import Image
    processor = load_processor(directory)
    if processor_model_type(processor) != info["model_type"]:
        raise ValueError(f"{directory} reloads as {type(processor).__name__}, not a {info['model_type']} processor")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = processor(text=[text], images=[[Image.new("RGB", (CANVAS, CANVAS), "white")]], add_special_tokens=False)
    ids = list(out["input_ids"][0])
    if info["model_type"] == "gemma3":
        got, want = ids.count(info["image_token_index"]), info["mm_tokens_per_image"]
    else:
        grid = out["image_grid_thw"][0]
        want = int(grid[0] * grid[1] * grid[2]) // info["spatial_merge_size"] ** 2
        got = ids.count(info["image_token_id"])
    if got != want or want == 0:
        raise ValueError(f"{directory}: an image became {got} image tokens, expected {want}; rebuild the processor")


# ---------------------------------------------------------------------------------------------------------------------
# The rendered task

CANVAS = 112
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")
# Pre-training: one skill per question. Fine-tuning: new instructions whose answers combine those skills.
PRETRAIN_TASKS = {"colour": "What colour is the shape?", "shape": "What shape is this?",
                  "count": "How many squares are there?", "position": "Where is the circle?"}
TASKS = {"describe": "Say the colour and place of the shape.", "tally": "Count the squares and name their colour."}
SPLIT_SIZES = {"pretrain": 4000, "pretrain-validation": 128, "train": 2000, "validation": 128}


def cache_dir() -> Path:
    """Where this recipe's embedded assets are built: embedded-vlm/ in the project's cache directory."""
    return project_cache_dir() / "embedded-vlm"


def _scene(rng: random.Random, task: str) -> dict:
    """Random scene parameters for a task: the image is a pure function of them."""
    colour = rng.choice(sorted(COLOURS))
    # Large shapes (radius 20-25 px of a 56 px quadrant): a quadrant's image token then clearly says what it holds.
    size, dx, dy = rng.randint(20, 25), rng.randint(-3, 3), rng.randint(-3, 3)
    if task in ("count", "tally"):
        cells = sorted(rng.sample(range(4), rng.randint(1, 4)))
        return dict(shape="square", colour=colour, cells=cells, size=size, dx=dx, dy=dy)
    shape = "circle" if task == "position" else rng.choice(SHAPES)
    return dict(shape=shape, colour=colour, cells=[rng.randrange(4)], size=size, dx=dx, dy=dy)


def _key(scene: dict) -> str:
    return json.dumps(scene, sort_keys=True)


def render(scene: dict):
    """The scene as a CANVAS x CANVAS RGB PIL image: one shape per cell (2 x 2 quadrants) on white."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    r, fill = scene["size"], COLOURS[scene["colour"]]
    for cell in scene["cells"]:
        cx = CANVAS // 4 * (1 + 2 * (cell % 2)) + scene["dx"]
        cy = CANVAS // 4 * (1 + 2 * (cell // 2)) + scene["dy"]
        if scene["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif scene["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def answer(task: str, scene: dict) -> str:
    place, count = PLACES[scene["cells"][0]], len(scene["cells"])
    return {"colour": scene["colour"], "shape": scene["shape"], "count": str(count), "position": place,
            "describe": f"{scene['colour']}, {place}",
            "tally": f"{count} {scene['colour']}"}[task]


def _scenes(seed: int, tasks: list[str], count: int, exclude: set[str] = frozenset()) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < count:
        task = tasks[len(out) % len(tasks)]
        scene = _scene(rng, task)
        if _key(scene) not in seen:
            seen.add(_key(scene))
            out.append((task, scene))
    return out


def task_scenes(split: str) -> list[tuple[str, dict]]:
    """(task, scene) pairs of a split; validation scenes are disjoint from every training split's."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}: use one of {sorted(SPLIT_SIZES)}")
    tasks = sorted(PRETRAIN_TASKS if split.startswith("pretrain") else TASKS)
    held_out = {_key(s) for seed, kinds in ((1, sorted(TASKS)), (3, sorted(PRETRAIN_TASKS)))
                for _, s in _scenes(seed, kinds, SPLIT_SIZES["validation"])}
    if split.endswith("validation"):
        return _scenes(1 if split == "validation" else 3, tasks, SPLIT_SIZES[split])
    return _scenes(0 if split == "train" else 2, tasks, SPLIT_SIZES[split], exclude=held_out)


def task_rows(split: str, image_dir: str | Path | None = None, base_dir: str | Path | None = None) -> list[dict]:
    """{messages, images} rows (LLaMA-Factory layout: "<image>" + question, then the answer).

    images hold PIL images, or with `image_dir` the paths of PNGs written there (relative to `base_dir` if given).
    """
    questions = {**PRETRAIN_TASKS, **TASKS}
    rows = []
    for i, (task, scene) in enumerate(task_scenes(split)):
        image = render(scene)
        if image_dir is not None:
            path = Path(image_dir) / f"{i:05d}.png"
            image.save(path)
            image = str(path.relative_to(base_dir) if base_dir is not None else path)
        rows.append({"messages": [{"role": "user", "content": "<image>" + questions[task]},
                                  {"role": "assistant", "content": answer(task, scene)}], "images": [image]})
    return rows


def _fingerprint() -> str:
    blob = json.dumps([CANVAS, COLOURS, SHAPES, PLACES, PRETRAIN_TASKS, TASKS, SPLIT_SIZES, PRETRAIN,
                       sorted(MODEL_NAMES), MODEL_VERSION, GEMMA3_IMAGE, QWEN2_5_VL_IMAGE], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tiny_hf_config(info: dict) -> dict:
    """The HF config.json of the embedded tiny model for a processor's `info` (build_processor's result): a small
    vision tower and a 4-layer text decoder, sized to learn the shapes task on a CPU in minutes."""
    text = dict(vocab_size=info["vocab_size"], hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.02,
                pad_token_id=info["pad_token_id"], eos_token_id=info["eos_token_id"],
                bos_token_id=info["bos_token_id"])
    if info["model_type"] == "gemma3":
        return dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"],
                    text_config=dict(text, model_type="gemma3_text", head_dim=32, sliding_window=512,
                                     query_pre_attn_scalar=32, rope_parameters=None),
                    vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, image_size=info["image_size"],
                                       patch_size=8, vision_use_head=False),
                    mm_tokens_per_image=info["mm_tokens_per_image"], image_token_index=info["image_token_index"],
                    boi_token_index=info["boi_token_index"], eoi_token_index=info["eoi_token_index"],
                    tie_word_embeddings=True, torch_dtype="float32")
    return dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
                # M-RoPE gives image tokens (t, h, w) positions on [t, h, w] sections of the rotary frequencies, highest
                # first: with the usual proportions (1:1.5:1.5) a 32-dim head leaves w only rotations of < 0.01 rad per
                # patch, and left/right were not learned. Few, fast t and h frequencies leave w useful ones.
                text_config=dict(text, model_type="qwen2_5_vl_text",
                                 rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 12],
                                                      rope_theta=100.0)),
                vision_config=dict(model_type="qwen2_5_vl", depth=2, hidden_size=64, intermediate_size=128,
                                   num_heads=4, patch_size=info["patch_size"],
                                   temporal_patch_size=info["temporal_patch_size"],
                                   spatial_merge_size=info["spatial_merge_size"], window_size=112,
                                   out_hidden_size=128, fullatt_block_indexes=[1]),
                image_token_id=info["image_token_id"], video_token_id=info["video_token_id"],
                vision_start_token_id=info["vision_start_token_id"], vision_end_token_id=info["vision_end_token_id"],
                tie_word_embeddings=True, torch_dtype="float32")


MODEL_NAMES = {"tiny-gemma3": "gemma3", "tiny-qwen2_5_vl": "qwen2_5_vl"}
# Token length of the longest rendered-task conversation, rounded up to 8 (Qwen's template adds a system turn).
SEQ_LEN = {"gemma3": 96, "qwen2_5_vl": 152}
MODEL_VERSION = 6  # bump when the task or the tiny models change, so cached assets are rebuilt
# Pre-training learning rate per architecture. Qwen2.5-VL's merger output has no norm: at 2e-3 its features grow ~200x
# and collapse to "which red level is there" (green and blue became near-identical; colour 38% on held-out images),
# while 5e-4 keeps them apart (every single skill but position >= 97%, the new instructions 100% after LoRA).
PRETRAIN = dict(steps=600, learning_rate={"gemma3": 2e-3, "qwen2_5_vl": 5e-4}, warmup_steps=30, global_batch_size=32)
PRETRAIN_CHECKPOINT_EVERY = 100  # steps between the checkpoints an interrupted pre-training resumes from


def pretrain_config(cfg, init_dir: Path, run_dir: Path, model_type: str):
    """`cfg` (the recipe's default config) set for full SFT of the random init on the single-skill questions, every
    group unfrozen, float32 on the CPU."""
    cfg.run_dir = str(run_dir)
    cfg.model.update(path=str(init_dir), dtype="float32", param_dtype="float32", freeze_vision_tower=False,
                     freeze_embeddings=False, freeze_language_model=False)
    cfg.peft.method = "none"
    cfg.data.seq_len = SEQ_LEN[model_type]
    cfg.data.train.path = f"{SCHEME}{TASK_NAME}/pretrain"
    cfg.data.validation.path = f"{SCHEME}{TASK_NAME}/pretrain-validation"
    import jax
    devices = jax.device_count()
    if PRETRAIN["global_batch_size"] % devices:
        raise ValueError(f"the embedded VLM is pre-trained with batch {PRETRAIN['global_batch_size']}, which {devices} "
                         f"devices do not divide; build it once on one device (JAX_PLATFORMS=cpu)")
    cfg.train.update(global_batch_size=PRETRAIN["global_batch_size"],
                     micro_batch_size=PRETRAIN["global_batch_size"] // devices, max_steps=PRETRAIN["steps"],
                     val_every=0, log_every=50)
    cfg.evaluation.samples = 32
    learning_rate = PRETRAIN["learning_rate"][model_type]
    cfg.optim.update(name="adamw", learning_rate=learning_rate, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=PRETRAIN["warmup_steps"],
                              min_learning_rate=learning_rate / 10)
    cfg.mesh.update(data=-1, fsdp=1)
    cfg.checkpoint.update(every_steps=PRETRAIN_CHECKPOINT_EVERY, keep=1)  # an interrupted build resumes
    cfg.export.when = "never"
    cfg.logging.tensorboard = False
    return cfg


def _build_model(name: str, root: Path, target: Path, default_config, run) -> None:
    """Processor + random init in HF format, pre-trained with the recipe (`default_config`, `run`), exported."""
    import jax

    from automodel_jax.auto import save_pretrained
    from automodel_jax.models.base import build_model
    from automodel_jax.training.trainer import pretrain_base
    if jax.process_count() > 1:
        raise ValueError("the embedded VLM is built by a single process; run the command once without multiple "
                         "processes first (it is cached), or set model.path to a real checkpoint")
    init_dir, processor_dir = root / f"{name}-init", root / f"{name}-processor"
    shutil.rmtree(processor_dir, ignore_errors=True)
    info = build_processor(MODEL_NAMES[name], processor_dir)
    save_pretrained(build_model(tiny_hf_config(info)), init_dir, overwrite=True)
    for f in processor_dir.iterdir():  # processor files beside the weights, as on the Hub
        shutil.move(str(f), init_dir / f.name)
    processor_dir.rmdir()
    print(f"building the embedded VLM {name}: pre-training {init_dir} on {sorted(PRETRAIN_TASKS)} "
          f"({PRETRAIN['steps']} steps, once; cached in {root})", flush=True)
    run_dir = root / f"{name}-pretrain-run"
    model = pretrain_base(run, pretrain_config(default_config(), init_dir, run_dir, MODEL_NAMES[name]),
                          f"embedded VLM {name}")
    save_pretrained(model, target, overwrite=True)
    shutil.rmtree(init_dir)
    shutil.rmtree(run_dir)


def materialize(name: str, default_config=None, run=None) -> str:
    """Local path for an `embedded:` name, built on first use (atomically: parallel runs are safe): the rendered
    `shapes/<split>` rows (jsonl + PNGs) or a tiny model (`tiny-gemma3`, `tiny-qwen2_5_vl`: processor + weights,
    pre-trained by the recipe whose `default_config` and `run` are given, so this module never imports it)."""
    what = name[len(SCHEME):] if name.startswith(SCHEME) else name
    if what in MODEL_NAMES:
        if run is None:
            raise ValueError(f"{name} is built by the VLM recipe; resolve it through "
                             f"automodel_jax.recipes.vlm.finetune.resolve_path")
        root = cache_dir() / _fingerprint()
        target = root / what
        if not (target / "config.json").is_file():
            _build_model(what, root, target, default_config, run)
        return str(target)
    task, _, split = what.partition("/")
    if task != TASK_NAME or split not in SPLIT_SIZES:
        known = ", ".join([f"{SCHEME}{m}" for m in MODEL_NAMES] + [f"{SCHEME}{TASK_NAME}/{s}" for s in SPLIT_SIZES])
        raise ValueError(f"unknown embedded VLM asset {name!r}; known: {known}")
    root = cache_dir() / _fingerprint()
    target = root / f"{TASK_NAME}-{split}.jsonl"
    if not target.is_file():
        images = root / f"{TASK_NAME}-{split}"
        tmp_images = root / f".{TASK_NAME}-{split}.{os.getpid()}.tmp"
        shutil.rmtree(tmp_images, ignore_errors=True)
        tmp_images.mkdir(parents=True)
        rows = task_rows(split, image_dir=tmp_images, base_dir=root)
        for row in rows:
            row["images"] = [p.replace(tmp_images.name, images.name, 1) for p in row["images"]]
        try:
            os.replace(tmp_images, images)
        except OSError:  # another process finished first: its identical images stand
            shutil.rmtree(tmp_images, ignore_errors=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, target)
    return str(target)


def resolve(path: str, default_config=None, run=None) -> str:
    """`path` itself, or the local path of an `embedded:` asset (see `materialize`)."""
    return materialize(path, default_config, run) if isinstance(path, str) and path.startswith(SCHEME) else path
