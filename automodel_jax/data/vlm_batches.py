"""VLM batches: per-model collation of encoded image-text samples into fixed-shape numpy batches for a jitted step,
and the resumable loader over them (`data/vlm.py` makes the samples)."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from automodel_jax.data.encoding import IGNORE
from automodel_jax.data.loader import BatchIterator, EpochPlan, check_loader_args
from automodel_jax.data.sources import DataError
from automodel_jax.data.vlm import VLMDataset, num_images


@dataclass(frozen=True)
class VLMCollator:
    """List of samples -> one fixed-shape numpy batch for a jitted step (B = len(samples) or batch_size).

    Every model gets, each [B, seq_len] int32 and right-padded:
      input_ids (pad_id on padding), labels (IGNORE on padding, prompts and image tokens), segment_ids (1 on real
      tokens, 0 on padding), positions (0..n-1, 0 on padding), token_type_ids (1 on image tokens, else 0);
      image_mask bool [B, max_images]: True for the sample's real images, in the order of their blocks in input_ids.
    Gemma 3 adds pixel_values float32 [B, max_images, 3, H, W] (image k of row b at [b, k]; zero images after the
      real ones).
    Qwen2.5-VL adds pixel_values float32 [B, max_patches, patch_dim] (the sample's patches, image after image, as
      the processor emits them; zero patches after), image_grid_thw int32 [B, max_images, 3] (t, h, w patch grid
      per image; zero rows after the real ones) and patch_mask bool [B, max_patches].
    Raises DataError when a sample is longer than seq_len or has more images/patches than the batch holds.
    """

    model_type: str
    seq_len: int
    max_images: int
    pad_id: int
    pixel_shape: tuple[int, ...]
    max_patches: int = 0
    batch_size: int | None = None

    def __call__(self, samples: Sequence[dict]) -> dict[str, np.ndarray]:
        b = self.batch_size or len(samples)
        if len(samples) > b:
            raise DataError(f"{len(samples)} samples do not fit a batch of {b}")
        s, m = self.seq_len, self.max_images
        batch = {name: np.zeros((b, s), np.int32) for name in ("input_ids", "labels", "segment_ids", "positions",
                                                                 "token_type_ids")}
        batch["input_ids"][:] = self.pad_id
        batch["labels"][:] = IGNORE
        batch["image_mask"] = np.zeros((b, m), bool)
        if self.model_type == "gemma3":
            batch["pixel_values"] = np.zeros((b, m, *self.pixel_shape), np.float32)
        else:
            if self.max_patches < 1:
                raise DataError("Qwen2.5-VL batches need max_patches > 0: set data.max_patches")
            batch["pixel_values"] = np.zeros((b, self.max_patches, *self.pixel_shape), np.float32)
            batch["image_grid_thw"] = np.zeros((b, m, 3), np.int32)
            batch["patch_mask"] = np.zeros((b, self.max_patches), bool)
        for row, sample in enumerate(samples):
            n, k = len(sample["input_ids"]), num_images(sample)
            if n > s:
                raise DataError(f"a sample has {n} tokens, more than the batch's seq_len {s}: build the dataset with "
                                "the same seq_len")
            if k > m:
                raise DataError(f"a sample has {k} images, more than data.max_images={m}: raise it")
            for name in ("input_ids", "labels", "token_type_ids"):
                batch[name][row, :n] = sample[name]
            batch["segment_ids"][row, :n] = 1
            batch["positions"][row, :n] = np.arange(n)
            batch["image_mask"][row, :k] = True
            pixels = sample["pixel_values"]
            if self.model_type == "gemma3":
                batch["pixel_values"][row, :k] = pixels
            else:
                if len(pixels) > self.max_patches:
                    raise DataError(f"a sample has {len(pixels)} vision patches, more than data.max_patches="
                                    f"{self.max_patches}: raise it or lower the processor's max_pixels")
                batch["pixel_values"][row, :len(pixels)] = pixels
                batch["patch_mask"][row, :len(pixels)] = True
                batch["image_grid_thw"][row, :k] = sample["image_grid_thw"]
        return batch


def make_collator(dataset: VLMDataset, *, seq_len: int, pad_id: int, max_images: int | None = None,
                  max_patches: int | None = None, batch_size: int | None = None) -> VLMCollator:
    """A collator for `dataset`'s model; max_images/max_patches default to the dataset's largest sample."""
    return VLMCollator(model_type=dataset.model_type, seq_len=seq_len, pad_id=pad_id,
                       max_images=max(1, dataset.max_images if max_images is None else max_images),
                       max_patches=(dataset.max_patches if max_patches is None else max_patches)
                       if dataset.model_type == "qwen2_5_vl" else 0,
                       pixel_shape=dataset.pixel_shape, batch_size=batch_size)


def _shard_batch(rows, *, dataset: VLMDataset, shard_index: int, batch_size: int, collate: VLMCollator):
    """This process's rows of a global batch (one sample index per row), collated."""
    return collate([dataset[i] for [i] in rows[shard_index * batch_size:(shard_index + 1) * batch_size]])


def make_vlm_loader(dataset: VLMDataset, collate: VLMCollator, *, batch_size: int, seed: int, shuffle: bool = True,
                    num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                    drop_remainder: bool = True) -> BatchIterator:
    """Resumable batches of `collate`'s format for this process, as data.loader.make_loader (no packing).

    Every process walks the same seeded plan of epochs and keeps rows [shard_index * batch_size, + batch_size) of
    each global batch; a short last batch of an epoch (drop_remainder=False) is filled with padding rows.
    """
    if collate.batch_size not in (None, batch_size):
        raise DataError(f"batch_size must match the collator's {collate.batch_size}, got {batch_size}")
    check_loader_args(shard_index=shard_index, shard_count=shard_count, batch_size=batch_size,
                      seq_len=collate.seq_len, seed=seed, num_epochs=num_epochs, num_samples=len(dataset))
    collate = VLMCollator(**{**collate.__dict__, "batch_size": batch_size})
    global_batch = batch_size * shard_count
    plan = EpochPlan(len(dataset), global_batch, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder)
    build = functools.partial(_shard_batch, dataset=dataset, shard_index=shard_index, batch_size=batch_size,
                              collate=collate)
    settings = dict(num_samples=len(dataset), global_batch_size=global_batch, seq_len=collate.seq_len, seed=seed,
                    shuffle=shuffle, num_epochs=num_epochs, drop_remainder=drop_remainder,
                    max_images=collate.max_images, max_patches=collate.max_patches)
    return BatchIterator(plan, build, settings, num_epochs)
