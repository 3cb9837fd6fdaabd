"""Grain input pipeline: shuffled epochs of samples -> fixed-shape [batch, seq_len] batches, resumable exactly.

Every process walks the same global stream (one seeded shuffle per epoch) and cuts the same global batches of
batch_size * shard_count rows; process p keeps rows [p * batch_size, (p + 1) * batch_size). So the processes' slices
are disjoint, they stack (in process order) into the global batch, and that global batch depends only on the global
batch size: a saved state can be restored by any process, and after a change of process count that keeps the global
batch size. With packing, every process packs the whole global stream the same way (cheap: samples are already
tokenized) for the same reasons.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from automodel_jax.data.encoding import IGNORE
from automodel_jax.data.sources import DataError

FIELDS = ("input_ids", "labels", "segment_ids", "positions")


def _empty_rows(count: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Padding rows: no tokens, no loss; used to fill the last batch when drop_remainder=False."""
    rows = {name: np.zeros((count, seq_len), np.int32) for name in FIELDS}
    rows["input_ids"][:] = pad_id
    rows["labels"][:] = IGNORE
    return rows


def _check_length(sample: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    if len(sample["input_ids"]) > seq_len:
        raise DataError(f"a sample has {len(sample['input_ids'])} tokens, more than the loader's seq_len {seq_len}: "
                        "build the dataset with the same seq_len")
    return sample


def _unpacked_batch(samples: Sequence[dict], *, shard_index: int, batch_size: int, seq_len: int,
                    pad_id: int) -> dict[str, np.ndarray]:
    """This process's samples of a global batch, one per row, right-padded (and padding rows if the batch is short)."""
    rows = _empty_rows(batch_size, seq_len, pad_id)
    for row, sample in enumerate(samples[shard_index * batch_size:(shard_index + 1) * batch_size]):
        n = len(_check_length(sample, seq_len)["input_ids"])
        rows["input_ids"][row, :n] = sample["input_ids"]
        rows["labels"][row, :n] = sample["labels"]
        rows["segment_ids"][row, :n] = 1
        rows["positions"][row, :n] = np.arange(n)
    return rows


def _packed_batch(packed: dict[str, np.ndarray], *, shard_index: int, batch_size: int, seq_len: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """This process's rows of grain's packer output (x, x_segment_ids, x_positions, zero-filled) in our layout."""
    mine = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
    segment_ids = packed["input_ids_segment_ids"][mine]
    rows = _empty_rows(batch_size, seq_len, pad_id)
    real = segment_ids > 0
    n = len(segment_ids)
    rows["input_ids"][:n] = np.where(real, packed["input_ids"][mine], pad_id)
    rows["labels"][:n] = np.where(real, packed["labels"][mine], IGNORE)
    rows["segment_ids"][:n] = segment_ids
    rows["positions"][:n] = np.where(real, packed["input_ids_positions"][mine], 0)
    return rows


class BatchIterator:
    """Iterator of batch dicts whose position is a small JSON-serialisable state (see get_state/set_state)."""

    def __init__(self, grain_iterator, settings: dict):
        self._iterator, self._settings = grain_iterator, settings

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        """Position in the stream plus the settings that give it meaning (checked on restore)."""
        return {"settings": dict(self._settings), "position": self._iterator.get_state()}

    def set_state(self, state: dict) -> None:
        """Continue exactly where the iterator that produced `state` was; the loader settings must match."""
        if not isinstance(state, dict) or set(state) != {"settings", "position"}:
            raise DataError("not a data loader state: expected the dict returned by get_state()")
        if state["settings"] != self._settings:
            raise DataError(f"data loader state was saved with settings {state['settings']}, but this loader has "
                            f"{self._settings}; restore with the same data, seed and global batch size")
        self._iterator.set_state(state["position"])


def make_loader(dataset: Sequence[dict], *, batch_size: int, seq_len: int, pad_id: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                packing: bool = False, drop_remainder: bool = True) -> BatchIterator:
    """Batches of {input_ids, labels, segment_ids, positions}, each [batch_size, seq_len] int32, for this process.

    num_epochs=None repeats forever (each epoch shuffled anew from `seed`). With drop_remainder=False the last,
    short global batch is kept and filled with padding rows, so shapes never change. packing=True first-fit packs
    samples, in stream order, into one global batch of rows at a time (the rows fill until a sample fits none of
    them); segment ids run 1..n per row and positions restart at 0 for each sample.
    """
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be None (forever) or positive, got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise DataError(f"seed must be in [0, 2**32), got {seed}")
    if len(dataset) == 0:
        raise DataError("the dataset is empty: nothing to load")
    global_batch = batch_size * shard_count
    shape = dict(shard_index=shard_index, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id)
    read_in_place = grain.ReadOptions(num_threads=0)  # samples are in memory: threads would only contend for the GIL
    samples = grain.MapDataset.source(dataset)
    if shuffle:
        samples = samples.shuffle(seed)
    samples = samples.repeat(num_epochs)
    if packing:
        rows = grain.experimental.FirstFitPackIterDataset(
            samples.map(functools.partial(_check_length, seq_len=seq_len)).to_iter_dataset(read_in_place),
            length_struct={"input_ids": seq_len, "labels": seq_len}, num_packing_bins=global_batch,
            shuffle_bins=False)
        batches = rows.batch(global_batch, drop_remainder=drop_remainder).map(
            functools.partial(_packed_batch, **shape))
    else:
        batches = samples.batch(global_batch, drop_remainder=drop_remainder, batch_fn=list).map(
            functools.partial(_unpacked_batch, **shape)).to_iter_dataset(read_in_place)
    settings = dict(num_samples=len(dataset), global_batch_size=global_batch, seq_len=seq_len, seed=seed,
                    shuffle=shuffle, num_epochs=num_epochs, packing=packing, drop_remainder=drop_remainder)
    return BatchIterator(iter(batches), settings)
