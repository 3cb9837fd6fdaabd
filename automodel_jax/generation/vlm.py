"""Generation with images: a user turn with images through the model's processor, then the KV-cache loop of
`generation.decode` (one prefill call that runs the vision tower, then one jitted step per new token).

The processor's outputs are re-laid out left-padded to a bucketed width, as `generation.generate` pads text prompts,
so every row decodes in lock step. Gemma 3 (`token_type_ids`): positions count each row's real tokens and each image's
tokens attend bidirectionally in the prefill. Qwen2.5-VL (`image_grid_thw`): M-RoPE positions [3, B, W] from the
model's `rope_index`, and decoding continues after each row's largest position (transformers' rope deltas).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from automodel_jax.generation import Sampling, bucket_length, decode, special_ids

# Processor outputs that are per token and padded with the rows ({name: value of a padding slot}).
PER_TOKEN = {"token_type_ids": 0}


def chat_inputs(processor, text: str, images: Sequence = ()) -> dict[str, np.ndarray]:
    """The processor's numpy outputs for one user turn holding `images` (PIL) then `text`, rendered with the
    processor's chat template and its generation prompt: input_ids, attention_mask [1, T], pixel_values, and
    token_type_ids (Gemma 3) or image_grid_thw (Qwen2.5-VL). ValueError when the processor has no chat template."""
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"processor {type(processor).__name__} has no chat template; save one with the model's "
                         "processor (chat_template.jinja)")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    rendered = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    out = processor(text=[rendered], images=[list(images)] if images else None, add_special_tokens=False,
                    return_tensors="np")
    return {k: np.asarray(v) for k, v in out.items()}


def _left_padded(inputs: dict, pad_token_id: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(tokens, mask [B, W] int32, per-token extras [B, W]) with each row's real tokens at the right end, in order."""
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim != 2 or ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with batch >= 1, got shape {list(ids.shape)}")
    real = np.asarray(inputs.get("attention_mask", np.ones_like(ids))).astype(bool)
    lengths = real.sum(axis=1)
    if not lengths.all():
        raise ValueError(f"row {int(np.argmin(lengths))} of input_ids has no tokens (attention_mask all 0)")
    batch, width = ids.shape[0], bucket_length(int(lengths.max()))
    tokens, mask = np.full((batch, width), pad_token_id, np.int32), np.zeros((batch, width), np.int32)
    per_token = {k: np.full((batch, width), fill, np.int32) for k, fill in PER_TOKEN.items() if k in inputs}
    for row in range(batch):
        n = int(lengths[row])
        tokens[row, width - n:], mask[row, width - n:] = ids[row, real[row]], 1
        for k, out in per_token.items():
            out[row, width - n:] = np.asarray(inputs[k])[row, real[row]]
    return tokens, mask, per_token


def generate_with_images(model, tokenizer, inputs: dict, *, max_new_tokens: int, temperature: float = 0.0,
                         top_k: int = 0, top_p: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                         pad_token_id: int | None = None, seed: int = 0,
                         stream: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New tokens for each row of a VLM's processor outputs `inputs` (input_ids and attention_mask [B, T], any
    padding side; pixel_values; token_type_ids for Gemma 3, image_grid_thw for Qwen2.5-VL; see `chat_inputs`).

    Stopping, sampling and `stream` as `generation.generate`; `tokenizer` (the processor's) supplies the default EOS
    and pad ids. Without pixel_values the prompt is text only. ValueError for malformed inputs.
    """
    sampling = Sampling(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
    eos, pad_token_id = special_ids(model, tokenizer, eos_token_id, pad_token_id)
    tokens, mask, extras = _left_padded(inputs, pad_token_id)
    pixels = inputs.get("pixel_values")
    if "image_grid_thw" in inputs and pixels is not None:  # Qwen2.5-VL: M-RoPE positions, vision tower layout
        grids = np.asarray(inputs["image_grid_thw"])
        positions = np.asarray(model.rope_index(tokens, grids, mask)[0], np.int32)
        next_position = np.where(mask[None] == 1, positions, -1).max(axis=(0, 2)) + 1
        extras["vision"] = model.vision_inputs(grids, num_patches=np.shape(pixels)[0])
    else:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        next_position = positions[:, -1] + 1
    if pixels is not None:
        extras["pixel_values"] = jnp.asarray(pixels, jnp.float32)
    return decode(model, tokens, positions, mask, next_position.astype(np.int32), extras,
                  max_new_tokens=max_new_tokens, sampling=sampling, eos=eos, pad_token_id=pad_token_id, seed=seed,
                  stream=stream)
