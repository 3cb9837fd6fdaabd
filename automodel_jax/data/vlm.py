"""Vision-language SFT data: image + text conversations -> processor outputs -> fixed-shape numpy batches.

Rows come in two layouts, both turned into OpenAI-style messages whose content is a list of parts
([{"type": "image"}, {"type": "text", "text": ...}]) plus the row's images as PIL RGB images:

* CORD-v2 style `{image, ground_truth}` (`kind="cord"`): the ground truth's `gt_parse` JSON becomes the answer, written
  as NeMo Automodel's CORD-v2 recipe does (`json2token`: `<s_key>value</s_key>`, lists joined by `<sep/>`), to a fixed
  question about the image.
* conversations (`kind="vlm_chat"`): `messages` with `<image>` placeholders in string content and an `images` list
  (LLaMA-Factory's mllm layout, paths relative to the data file), or content parts with `{"type": "image"}`.

Each conversation is rendered with the processor's chat template, and the processor itself expands the image
placeholders and preprocesses the images (we never re-implement that). Loss is on assistant turns only (the template's
text after the assistant header through its end-of-turn marker); prompts, image and vision special tokens and padding
get labels IGNORE (-100), shifted for next-token prediction like the LLM builders (data/encoding.py: input_ids =
ids[:-1], labels[t] = ids[t + 1]).

Supported processors: transformers' Gemma3Processor (model type "gemma3") and Qwen2_5_VLProcessor ("qwen2_5_vl").
"""
from __future__ import annotations

import importlib.util
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
from ml_collections import config_dict
import numpy as np

from automodel_jax.data.builders import check_fit, loss_span
from automodel_jax.data.encoding import IGNORE, assistant_spans, encode_spans, shift
from automodel_jax.data.sources import DataError, load_rows, require_columns

MODEL_TYPES = ("gemma3", "qwen2_5_vl")
IMAGE_PLACEHOLDER = "<image>"
VLM_TRUNCATION_MODES = ("truncate", "drop", "error")
CORD_QUESTION = "Describe this image."
# Token strings of each model family that belong to an image (never labelled); the first one opens an image's block.
IMAGE_TOKENS = {
    "gemma3": ("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
    "qwen2_5_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Processors


def qwen_images_only_processor_class():
    """Qwen2_5_VLProcessor without its video processor, for hosts without torchvision (transformers 5 needs it there).

    transformers' Qwen2.5-VL video processor only exists with torchvision, and the processor refuses to be built or
    loaded without one. Images are handled exactly as by Qwen2_5_VLProcessor (same class, same __call__); only the
    video sub-processor is left out.
    """
    from transformers import Qwen2_5_VLProcessor

    class Qwen2_5_VLImagesOnlyProcessor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return Qwen2_5_VLImagesOnlyProcessor


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def load_processor(directory: str | Path):
    """A saved Gemma 3 or Qwen2.5-VL processor, via AutoProcessor (images-only Qwen2.5-VL without torchvision).

    Raises DataError when the directory holds no processor, or one of another model family.
    """
    from transformers import AutoProcessor
    directory = Path(directory)
    config_file = directory / "processor_config.json"
    if directory.is_dir() and not (config_file.is_file() or (directory / "preprocessor_config.json").is_file()):
        raise DataError(f"{directory} has no processor_config.json or preprocessor_config.json, so no image processor; "
                        "save the model's processor there (processor.save_pretrained) or use the original checkpoint")
    saved_class = json.loads(config_file.read_text())["processor_class"] if config_file.is_file() else None
    if saved_class == "Qwen2_5_VLProcessor" and not has_torchvision():
        processor = qwen_images_only_processor_class().from_pretrained(directory)
    else:
        try:
            processor = AutoProcessor.from_pretrained(directory)
        except (OSError, ValueError, ImportError) as e:
            raise DataError(f"could not load a processor from {directory} ({type(e).__name__}: {e}); point the "
                            "model path at a Gemma 3 or Qwen2.5-VL checkpoint with its processor files") from e
    processor_model_type(processor)  # fails early for other processors
    return processor


def processor_model_type(processor) -> str:
    """"gemma3" or "qwen2_5_vl" from the processor's class; DataError for any other processor."""
    from transformers import Gemma3Processor, Qwen2_5_VLProcessor
    if isinstance(processor, Gemma3Processor):
        return "gemma3"
    if isinstance(processor, Qwen2_5_VLProcessor):
        return "qwen2_5_vl"
    raise DataError(f"unsupported processor {type(processor).__name__}: VLM data supports Gemma3Processor and "
                    "Qwen2_5_VLProcessor")


def image_token_ids(processor) -> np.ndarray:
    """Ids of every image/vision special token of the processor's vocabulary (int32, those the vocabulary has)."""
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    return np.asarray([vocab[t] for t in IMAGE_TOKENS[processor_model_type(processor)] if t in vocab], np.int32)


def image_start_id(processor) -> int:
    """The token that opens each image's block: <start_of_image> (Gemma 3), <|vision_start|> (Qwen2.5-VL)."""
    token = IMAGE_TOKENS[processor_model_type(processor)][0]
    ids = processor.tokenizer.get_vocab()
    if token not in ids:
        raise DataError(f"the processor's tokenizer lacks {token!r}, which its model needs to mark images")
    return ids[token]


def pixel_shape(processor) -> tuple[int, ...]:
    """Per-image pixel shape (Gemma 3: (3, H, W)) or per-patch shape (Qwen2.5-VL: (3 * temporal * patch**2,))."""
    ip = processor.image_processor
    if processor_model_type(processor) == "gemma3":
        return (3, int(ip.size["height"]), int(ip.size["width"]))
    return (3 * int(ip.temporal_patch_size) * int(ip.patch_size) ** 2,)


# ---------------------------------------------------------------------------------------------------------------------
# Rows -> (messages, images)


def load_image(image, base_dir: Path | None, where: str):
    """A PIL RGB image from a PIL image, a path (relative to base_dir), or a datasets {"bytes", "path"} dict.

    Raises DataError naming `where` and the file when it is missing or cannot be decoded.
    """
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    source: object
    if isinstance(image, dict) and image.get("bytes"):
        source, name = io.BytesIO(image["bytes"]), image.get("path") or "<bytes>"
    elif isinstance(image, dict) and image.get("path"):
        return load_image(image["path"], base_dir, where)
    elif isinstance(image, (str, Path)) and str(image):
        path = Path(image).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise DataError(f"{where}: image file {path} does not exist; fix the row's image path (relative paths "
                            f"are read from {base_dir})")
        source, name = path, str(path)
    else:
        raise DataError(f"{where}: an image must be a path, a PIL image or a {{bytes, path}} dict, got {image!r:.80}")
    try:
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many kinds for truncated or non-image files
        raise DataError(f"{where}: cannot read image {name} ({type(e).__name__}: {e}); replace or remove the "
                        "file") from e


def json2token(value, sort_keys: bool = True) -> str:
    """CORD-v2 ground truth -> target text: dict -> <s_key>value</s_key> (keys in reverse order), lists by <sep/>."""
    if isinstance(value, dict):
        if len(value) == 1 and "text_sequence" in value:
            return str(value["text_sequence"])
        keys = sorted(value, reverse=True) if sort_keys else list(value)
        return "".join(f"<s_{k}>{json2token(value[k], sort_keys)}</s_{k}>" for k in keys)
    if isinstance(value, list):
        return "<sep/>".join(json2token(item, sort_keys) for item in value)
    return str(value)


def cord_target(ground_truth, where: str) -> str:
    """The answer text of a CORD-v2 `ground_truth` (JSON string or dict with `gt_parse`, or `gt_parses`' first)."""
    try:
        parsed = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: ground_truth is not JSON ({e}); it must be '{{\"gt_parse\": {{...}}}}'") from e
    if isinstance(parsed, dict) and "gt_parse" in parsed:
        return json2token(parsed["gt_parse"])
    if isinstance(parsed, dict) and parsed.get("gt_parses"):
        return json2token(parsed["gt_parses"][0])
    raise DataError(f"{where}: ground_truth has no 'gt_parse' (or 'gt_parses'): {str(ground_truth):.80}")


def cord_conversation(image, ground_truth, question: str, base_dir: Path | None, where: str):
    """(messages, [image]): the user sends the image and `question`, the assistant answers json2token(gt_parse)."""
    answer = cord_target(ground_truth, where)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return messages, [load_image(image, base_dir, where)]


def _parts(content, where: str) -> list[dict]:
    """Message content as parts; `<image>` placeholders in strings become image parts in place."""
    if isinstance(content, str):
        parts = []
        for i, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if i:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        return parts
    if isinstance(content, list):
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                inline = part.get("image") if part.get("image") is not None else part.get("path")
                parts.append({"type": "image", **({"inline": inline} if inline is not None else {})})
            elif kind == "text" and isinstance(part.get("text", part.get("value")), str):
                parts.extend(_parts(part.get("text", part.get("value")), where))
            else:
                raise DataError(f"{where}: content parts must be {{'type': 'image'}} or {{'type': 'text', 'text': "
                                f"str}}, got {part!r:.80}")
        return parts
    raise DataError(f"{where}: message content must be a string or a list of parts, got {type(content).__name__}")


def chat_conversation(messages, images, base_dir: Path | None, where: str):
    """(messages as parts, PIL images) from a conversation row; images fill the image parts in order.

    Raises DataError when placeholders and images differ in number, an image cannot be read, a message lacks
    role/content, or an assistant turn is empty.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages, got {messages!r:.80}")
    images = list(images or [])
    out, refs = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} needs 'role' and 'content', got {message!r:.80}")
        parts = _parts(message["content"], f"{where} message {i}")
        for part in parts:
            if part["type"] == "image":
                refs.append(part.pop("inline") if "inline" in part else None)
        out.append({"role": message["role"], "content": parts})
    placeholders = sum(ref is None for ref in refs)
    if placeholders != len(images):
        raise DataError(f"{where}: {placeholders} image placeholder(s) but {len(images)} image(s) listed; give one "
                        f"{IMAGE_PLACEHOLDER} (or image part) per image")
    listed = iter(images)
    loaded = [load_image(next(listed) if ref is None else ref, base_dir, where) for ref in refs]
    return out, loaded


def _check_turns(messages: list[dict], where: str) -> None:
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn; add the answer")
    for m in assistant:
        if any(p["type"] == "image" for p in m["content"]):
            raise DataError(f"{where}: an assistant turn contains an image; images must be in user turns")
        if not "".join(p["text"] for p in m["content"]).strip():
            raise DataError(f"{where}: an assistant turn is empty; remove the row or give the answer")


# ---------------------------------------------------------------------------------------------------------------------
# Conversation -> sample


def _chat_template(processor) -> str:
    template = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        raise DataError(f"processor {type(processor).__name__} has no chat template: save one with the processor "
                        "(chat_template.jinja)")
    return template


def encode_conversation(processor, messages: list[dict], images: list, where: str) -> dict[str, np.ndarray]:
    """One conversation -> a shifted sample through the processor (placeholders expanded, images preprocessed).

    Returns int32 arrays input_ids, labels (IGNORE except on assistant-turn targets), token_type_ids (1 on image
    tokens), each [n]; plus for Gemma 3 pixel_values float32 [num_images, 3, H, W], for Qwen2.5-VL pixel_values
    float32 [num_patches, patch_dim] and image_grid_thw int32 [num_images, 3]. Raises DataError for empty assistant
    turns or a template that does not render prefixes as prefixes.
    """
    _check_turns(messages, where)
    template, tokenizer = _chat_template(processor), processor.tokenizer

    try:
        text, spans = assistant_spans(tokenizer, messages, template)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    try:
        out = processor(text=[text], images=[images] if images else None, add_special_tokens=False,
                        return_text_replacement_offsets=True)
    except ValueError as e:  # e.g. the template dropped an image part, so placeholders and images differ
        raise DataError(f"{where}: the processor rejected the conversation ({e})") from e
    # Map the spans onto the expanded text (each image placeholder was replaced by its full token sequence).
    replacements = out["text_replacement_offsets"][0]
    expanded, last = [], 0
    for r in replacements:
        expanded += [text[last:r["span"][0]], r["replacement"]]
        last = r["span"][1]
    expanded = "".join(expanded) + text[last:]

    def moved(p: int) -> int:
        return p + sum(len(r["replacement"]) - (r["span"][1] - r["span"][0]) for r in replacements
                       if r["span"][1] <= p)

    ids, supervised = encode_spans(tokenizer, expanded, [(moved(a), moved(b)) for a, b in spans])
    if ids != list(out["input_ids"][0]):
        raise DataError(f"{where}: the processor's tokens differ from its tokenizer's on the same text; the processor "
                        "must tokenize with add_special_tokens=False like its tokenizer")
    ids_arr = np.asarray(ids, np.int32)
    is_image = np.isin(ids_arr, image_token_ids(processor))
    sample = shift(ids, list(np.asarray(supervised) & ~is_image))
    type_ids = out.get("token_type_ids", out.get("mm_token_type_ids"))
    sample["token_type_ids"] = (np.asarray(type_ids[0], np.int32) if type_ids is not None
                                else is_image.astype(np.int32))[:-1]
    model_type = processor_model_type(processor)
    sample["pixel_values"] = (np.asarray(out["pixel_values"], np.float32) if images
                              else np.zeros((0, *pixel_shape(processor)), np.float32))
    if model_type == "qwen2_5_vl":
        sample["image_grid_thw"] = (np.asarray(out["image_grid_thw"], np.int32) if images
                                    else np.zeros((0, 3), np.int32))
    return sample


# ---------------------------------------------------------------------------------------------------------------------
# Datasets


class VLMDataset(Sequence):
    """Samples from encode_conversation (labels already shifted), their model type, and how fitting went (`stats`,
    `spans`: as data.builders.TokenizedDataset)."""

    def __init__(self, name: str, model_type: str, samples: list[dict[str, np.ndarray]], stats: dict[str, int],
                 pixel_shape: tuple[int, ...], spans: np.ndarray):
        self.name, self.model_type, self.samples, self.stats = name, model_type, samples, stats
        self.pixel_shape, self.spans = pixel_shape, spans

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]

    @property
    def max_images(self) -> int:
        """Most images in one sample (a lower bound for the collator's max_images)."""
        return max(num_images(s) for s in self.samples)

    @property
    def max_patches(self) -> int:
        """Most vision patches in one sample (Qwen2.5-VL; a lower bound for the collator's max_patches)."""
        return max(len(s["pixel_values"]) for s in self.samples)


def num_images(sample) -> int:
    """How many images a sample holds."""
    return len(sample["image_grid_thw"]) if "image_grid_thw" in sample else len(sample["pixel_values"])


def _truncate(sample: dict, seq_len: int, start_id: int, image_ids: np.ndarray) -> tuple[dict, int]:
    """Cut to seq_len tokens, moving the cut back to an image's first token if it would split one; drop cut images.

    Returns the sample and how many images were dropped with the text.
    """
    ids = sample["input_ids"]
    cut = seq_len
    is_image = np.isin(ids, image_ids)
    while cut > 0 and is_image[cut - 1] and (cut < len(ids) and is_image[cut]):
        cut -= 1  # inside a run of image tokens: back to its start
    kept_images = int((ids[:cut] == start_id).sum())
    out = {k: sample[k][:cut] for k in ("input_ids", "labels", "token_type_ids")}  # labels of image tokens: IGNORE
    if "image_grid_thw" in sample:
        grid = sample["image_grid_thw"][:kept_images]
        out["image_grid_thw"] = grid
        out["pixel_values"] = sample["pixel_values"][:int(np.prod(grid, axis=1).sum())]
    else:
        out["pixel_values"] = sample["pixel_values"][:kept_images]
    return out, num_images(sample) - kept_images


def fit_vlm_samples(name: str, processor, encoded, seq_len: int, truncation: str) -> VLMDataset:
    """Fit samples to seq_len: "error" raises, "drop" skips, "truncate" cuts text (never inside an image's tokens;
    images after the cut are dropped with it). Samples left without loss are dropped and counted; how many rows that
    lost is judged by data.builders.check_fit."""
    if truncation not in VLM_TRUNCATION_MODES:
        raise DataError(f"data.truncation must be one of {VLM_TRUNCATION_MODES} for VLM data, got {truncation!r}")
    if seq_len < 1:
        raise DataError(f"data.seq_len must be positive, got {seq_len}")
    start_id, image_ids = image_start_id(processor), image_token_ids(processor)
    stats = {"rows": 0, "samples": 0, "truncated": 0, "dropped_too_long": 0, "dropped_no_loss": 0, "images_cut": 0}
    samples, spans = [], []
    for where, sample in encoded:
        stats["rows"] += 1
        spans.append(loss_span(sample))
        if len(sample["input_ids"]) > seq_len:
            if truncation == "error":
                raise DataError(f"{where}: {len(sample['input_ids'])} tokens (images included) exceed data.seq_len "
                                f"{seq_len}; raise seq_len, shrink the images, or set data.truncation to 'drop'")
            if truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            sample, cut = _truncate(sample, seq_len, start_id, image_ids)
            stats["truncated"] += 1
            stats["images_cut"] += cut
        if not (sample["labels"] != IGNORE).any():
            stats["dropped_no_loss"] += 1
            continue
        samples.append(sample)
    stats["samples"] = len(samples)
    return VLMDataset(name, processor_model_type(processor), samples, stats, pixel_shape(processor),
                      np.asarray(spans, np.int64).reshape(-1, 2))


def _rows_and_base(path: str, split: str, limit: int | None):
    """Rows plus the folder relative image paths are read from; an imagefolder directory reads its metadata.jsonl."""
    local = Path(path).expanduser()
    if local.is_dir() and (local / "metadata.jsonl").is_file():
        source = local / "metadata.jsonl"
        return load_rows(str(source), split, limit), local, str(source)
    base = local.parent if local.is_file() else None
    return load_rows(path, split, limit), base, path


def build_cord(cfg, processor, seq_len: int, truncation: str) -> VLMDataset:
    """CORD-v2 layout: `image_column` (file_name in an imagefolder's metadata.jsonl) + `ground_truth_column`."""
    rows, base, source = _rows_and_base(cfg.path, cfg.split, cfg.limit)
    image_column = cfg.image_column
    if image_column not in rows.column_names and "file_name" in rows.column_names:
        image_column = "file_name"
    require_columns(rows, {image_column: "image_column", cfg.ground_truth_column: "ground_truth_column"}, source)

    def encoded():
        for i, row in enumerate(rows):
            where = f"{source} row {i}"
            messages, images = cord_conversation(row[image_column], row[cfg.ground_truth_column], cfg.question, base,
                                                 where)
            yield where, encode_conversation(processor, messages, images, where)

    return fit_vlm_samples(source, processor, encoded(), seq_len, truncation)


def build_vlm_chat(cfg, processor, seq_len: int, truncation: str) -> VLMDataset:
    """Conversations: `messages_column` (role/content, `<image>` placeholders or image parts) + `images_column`."""
    rows, base, source = _rows_and_base(cfg.path, cfg.split, cfg.limit)
    require_columns(rows, {cfg.messages_column: "messages_column"}, source)
    has_images = cfg.images_column in rows.column_names

    def encoded():
        for i, row in enumerate(rows):
            where = f"{source} row {i}"
            messages, images = chat_conversation(row[cfg.messages_column],
                                                 row[cfg.images_column] if has_images else [], base, where)
            yield where, encode_conversation(processor, messages, images, where)

    return fit_vlm_samples(source, processor, encoded(), seq_len, truncation)


def encode_rows(name: str, processor, rows: Sequence[dict], seq_len: int, truncation: str,
                base_dir: str | Path | None = None, min_kept_fraction: float = 0.1) -> VLMDataset:
    """In-memory conversation rows ({messages, images}: PIL images or paths under base_dir) -> VLMDataset (rows lost
    to seq_len reported by data.builders.check_fit)."""
    base = Path(base_dir) if base_dir is not None else None

    def encoded():
        for i, row in enumerate(rows):
            where = f"{name} row {i}"
            messages, images = chat_conversation(row.get("messages"), row.get("images"), base, where)
            yield where, encode_conversation(processor, messages, images, where)

    dataset = fit_vlm_samples(name, processor, encoded(), seq_len, truncation)
    check_fit(dataset, seq_len, truncation, min_kept_fraction)
    return dataset


VLM_BUILDERS: dict[str, Callable[..., VLMDataset]] = {"cord": build_cord, "vlm_chat": build_vlm_chat}


def vlm_dataset_defaults(kind: str, path: str, split: str) -> dict:
    """Every key the VLM builders read (overridable from the command line)."""
    return dict(kind=kind, path=path, split=split, limit=config_dict.placeholder(int), question=CORD_QUESTION,
                image_column="image", ground_truth_column="ground_truth", messages_column="messages",
                images_column="images")


def build_vlm_dataset(ds_cfg, processor, seq_len: int, truncation: str, min_kept_fraction: float = 0.1) -> VLMDataset:
    """Dispatch on `ds_cfg.kind` ("cord" or "vlm_chat"); recipes resolve `embedded:` names to files first. Rows lost
    to seq_len are reported by data.builders.check_fit (a DataError when fewer than `min_kept_fraction` are kept)."""
    given = dict(ds_cfg)
    builder = VLM_BUILDERS.get(given.get("kind"))
    if builder is None:
        raise DataError(f"unknown VLM dataset kind {given.get('kind')!r}: use one of {sorted(VLM_BUILDERS)}")
    cfg = vlm_dataset_defaults(given["kind"], path="", split="train")
    unknown = sorted(set(given) - set(cfg))
    if unknown:
        raise DataError(f"unknown VLM dataset setting(s) {unknown}: the known ones are {sorted(cfg)}")
    cfg.update(given)
    dataset = builder(ml_collections.ConfigDict(cfg), processor, seq_len, truncation)
    check_fit(dataset, seq_len, truncation, min_kept_fraction)
    return dataset


def conversation_prompts(ds_cfg, limit: int) -> list[dict]:
    """The first `limit` single-turn rows of a `vlm_chat` or `cord` data set as generation prompts:
    {messages (the conversation without its final assistant turn, as parts), images (PIL), question, answer}, for
    held-out answers and accuracy. Raises DataError for rows the builders would refuse."""
    given = {**vlm_dataset_defaults(ds_cfg["kind"], path="", split="train"), **dict(ds_cfg)}
    cfg = ml_collections.ConfigDict(given)
    rows, base, source = _rows_and_base(cfg.path, cfg.split, min(limit, cfg.limit or limit))
    out = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        if cfg.kind == "cord":
            messages, images = cord_conversation(row[cfg.image_column], row[cfg.ground_truth_column], cfg.question,
                                                 base, where)
        else:
            messages, images = chat_conversation(row[cfg.messages_column], row.get(cfg.images_column) or [], base,
                                                 where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last turn is {messages[-1]['role']!r}, not the assistant's answer")
        text = lambda m: "".join(p.get("text", "") for p in m["content"] if p["type"] == "text")  # noqa: E731
        out.append(dict(messages=messages[:-1], images=images, question=text(messages[-2]),
                        answer=text(messages[-1])))
    return out
