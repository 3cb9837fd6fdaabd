"""Input pipeline: shuffled epochs of samples -> fixed-shape [batch, seq_len] batches, resumable exactly.

Epoch by epoch, every process computes the same plan (which samples fill each row of each global batch of
batch_size * shard_count rows) and keeps rows [p * batch_size, (p + 1) * batch_size) of each global batch. So the
processes' slices are disjoint, they stack (in process order) into the global batch, and that global batch depends only
on the global batch size: a saved state can be restored by any process, and after a change of process count that keeps
the global batch size. Each epoch is one pass over the data: every sample lands in exactly one row of one batch of the
epoch (packed or not), batches never span two epochs, and each epoch is shuffled anew from the seed (grain's index
shuffle). With packing, an epoch's samples are first-fit packed into one global batch of rows at a time (cheap:
samples are already tokenized), so an epoch has fewer batches than unpacked; `num_batches(epoch)` says how many.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
from grain.experimental import index_shuffle

from automodel_jax.data.encoding import IGNORE
from automodel_jax.data.sources import DataError

FIELDS = ("input_ids", "labels", "segment_ids", "positions")
# A global batch: for each of its rows, the dataset indices of the samples in that row (one unpacked).
Batch = list[list[int]]


def _empty_rows(count: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Padding rows: no tokens, no loss; fill rows no sample was placed in (the last batch of an epoch)."""
    rows = {name: np.zeros((count, seq_len), np.int32) for name in FIELDS}
    rows["input_ids"][:] = pad_id
    rows["labels"][:] = IGNORE
    return rows


def _first_fit(order: np.ndarray, lengths: np.ndarray, rows: int, seq_len: int) -> list[Batch]:
    """First-fit packing of samples, in `order`, into `rows` rows of `seq_len` tokens at a time (grain's
    FirstFitPackIterDataset algorithm): each sample goes to the first row with room; when one fits no row, the rows
    are emitted as a global batch and a new batch starts with it. The open rows are emitted at the end."""
    batches, current, free = [], [[] for _ in range(rows)], np.full(rows, seq_len)
    for index in order:
        n = lengths[index]
        fits = free >= n
        row = int(fits.argmax())
        if not fits[row]:
            batches.append(current)
            current, row = [[] for _ in range(rows)], 0
            free[:] = seq_len
        current[row].append(int(index))
        free[row] -= n
    if current[0]:
        batches.append(current)
    return batches


class EpochPlan:
    """The global batches of each epoch, as sample indices per row (see the module docstring).

    `lengths`: each sample's token count, for packing (None: one sample per row). The last batch of an epoch is
    short unless the data divide evenly; drop_remainder=True leaves it out (those samples skip that epoch).
    """

    def __init__(self, num_samples: int, global_batch: int, *, seed: int, shuffle: bool, drop_remainder: bool,
                 lengths: np.ndarray | None = None, seq_len: int | None = None):
        self.num_samples, self.global_batch, self.drop_remainder = num_samples, global_batch, drop_remainder
        self.lengths, self.seq_len = lengths, seq_len
        self.seed, self.shuffle = seed, shuffle
        self._cached: tuple[int | None, list[Batch]] = (None, [])

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices of `epoch` in the order they are read: grain's index shuffle with the epoch's seed, as
        grain.MapDataset.shuffle(seed) numbers a repeated dataset."""
        n = self.num_samples
        if not self.shuffle:
            return np.arange(n)
        seed = (self.seed + epoch) % 2**32
        return np.fromiter((index_shuffle(k, max_index=n - 1, seed=seed, rounds=4) for k in range(n)), np.int64, n)

    def batches(self, epoch: int) -> list[Batch]:
        """The global batches of `epoch` (the last epoch asked for is kept)."""
        if self._cached[0] != epoch:
            self._cached = (epoch, self._plan(epoch))
        return self._cached[1]

    def _plan(self, epoch: int) -> list[Batch]:
        order = self.order(epoch)
        if self.lengths is not None:
            batches = _first_fit(order, self.lengths, self.global_batch, self.seq_len)
            full = len(batches) - 1  # the last batch holds the rows left open at the epoch's end
        else:
            batches = [[[int(i)] for i in order[j:j + self.global_batch]]
                       for j in range(0, self.num_samples, self.global_batch)]
            full = self.num_samples // self.global_batch
        return batches[:full] if self.drop_remainder else batches

    @functools.cached_property
    def max_segments(self) -> int:
        """The most samples any row can hold, in every epoch (a static bound for fused attention of packed rows): 1
        unpacked; packed, how many of the shortest non-empty samples fit in seq_len together."""
        if self.lengths is None:
            return 1
        shortest = np.sort(self.lengths[self.lengths > 0])
        return max(1, int(np.searchsorted(np.cumsum(shortest), self.seq_len, side="right")))

    def num_batches(self, epoch: int) -> int:
        """How many global batches `epoch` has (packed: depends on the epoch's shuffle)."""
        if self.lengths is None:
            whole, rest = divmod(self.num_samples, self.global_batch)
            return whole + (bool(rest) and not self.drop_remainder)
        return len(self.batches(epoch))


class BatchIterator:
    """Iterator of batch dicts whose position is a small JSON-serialisable state (see get_state/set_state).

    `build(rows)` turns this process's rows of a global batch (sample indices per row) into the batch dict.
    """

    def __init__(self, plan: EpochPlan, build: Callable[[Batch], dict], settings: dict, num_epochs: int | None):
        self.plan, self._build, self._settings, self.num_epochs = plan, build, settings, num_epochs
        self._epoch = self._batch = 0

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        while self.num_epochs is None or self._epoch < self.num_epochs:
            batches = self.plan.batches(self._epoch)
            if not batches:
                raise DataError(f"an epoch of {self.plan.num_samples} samples fills no whole global batch of "
                                f"{self.plan.global_batch} rows; use drop_remainder=False or a smaller batch")
            if self._batch < len(batches):
                self._batch += 1
                return self._build(batches[self._batch - 1])
            self._epoch, self._batch = self._epoch + 1, 0
        raise StopIteration

    def batches_in_epochs(self, epochs: int) -> int:
        """Global batches (train steps) in the first `epochs` epochs."""
        return sum(self.plan.num_batches(epoch) for epoch in range(epochs))

    def get_state(self) -> dict:
        """Position in the stream plus the settings that give it meaning (checked on restore)."""
        return {"settings": dict(self._settings), "position": {"epoch": self._epoch, "batch": self._batch}}

    def set_state(self, state: dict) -> None:
        """Continue exactly where the iterator that produced `state` was; the loader settings must match."""
        if not isinstance(state, dict) or set(state) != {"settings", "position"}:
            raise DataError("not a data loader state: expected the dict returned by get_state()")
        if state["settings"] != self._settings:
            raise DataError(f"data loader state was saved with settings {state['settings']}, but this loader has "
                            f"{self._settings}; restore with the same data, seed and global batch size")
        position = state["position"]
        if not isinstance(position, dict) or set(position) != {"epoch", "batch"}:
            raise DataError(f"data loader position {position} was written by an older version (epochs were not "
                            f"kept apart then); start a fresh run_dir")
        self._epoch, self._batch = int(position["epoch"]), int(position["batch"])


def _check_length(sample: dict[str, np.ndarray], seq_len: int) -> int:
    n = len(sample["input_ids"])
    if n > seq_len:
        raise DataError(f"a sample has {n} tokens, more than the loader's seq_len {seq_len}: build the dataset "
                        "with the same seq_len")
    return n


def _token_rows(rows: Batch, *, dataset: Sequence[dict], shard_index: int, batch_size: int, seq_len: int,
                pad_id: int) -> dict[str, np.ndarray]:
    """This process's rows of a global batch: each row's samples one after another (segment ids 1..n, positions
    restarting at 0 for each), right-padded; rows without samples are padding."""
    out = _empty_rows(batch_size, seq_len, pad_id)
    for row, indices in enumerate(rows[shard_index * batch_size:(shard_index + 1) * batch_size]):
        start = 0
        for segment, index in enumerate(indices, start=1):
            sample = dataset[index]
            end = start + _check_length(sample, seq_len - start)
            out["input_ids"][row, start:end] = sample["input_ids"]
            out["labels"][row, start:end] = sample["labels"]
            out["segment_ids"][row, start:end] = segment
            out["positions"][row, start:end] = np.arange(end - start)
            start = end
    return out


def check_loader_args(*, shard_index: int, shard_count: int, batch_size: int, seq_len: int, seed: int,
                      num_epochs: int | None, num_samples: int) -> None:
    """DataError naming the first bad loader argument."""
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if num_epochs is not None and num_epochs < 1:
        raise DataError(f"num_epochs must be None (forever) or positive, got {num_epochs}")
    if not 0 <= seed < 2**32:
        raise DataError(f"seed must be in [0, 2**32), got {seed}")
    if num_samples == 0:
        raise DataError("the dataset is empty: nothing to load")


def make_loader(dataset: Sequence[dict], *, batch_size: int, seq_len: int, pad_id: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                packing: bool = False, drop_remainder: bool = True) -> BatchIterator:
    """Batches of {input_ids, labels, segment_ids, positions}, each [batch_size, seq_len] int32, for this process.

    num_epochs=None repeats forever (each epoch shuffled anew from `seed`). With drop_remainder=False the last,
    short global batch of each epoch is kept and filled with padding rows, so shapes never change. packing=True
    first-fit packs each epoch's samples, in stream order, into one global batch of rows at a time (the rows fill
    until a sample fits none of them); segment ids run 1..n per row and positions restart at 0 for each sample.
    Raises DataError for bad arguments, and for a sample longer than seq_len (when its batch is built, or when the
    epoch is packed).
    """
    check_loader_args(shard_index=shard_index, shard_count=shard_count, batch_size=batch_size, seq_len=seq_len,
                      seed=seed, num_epochs=num_epochs, num_samples=len(dataset))
    global_batch = batch_size * shard_count
    lengths = None
    if packing:
        lengths = np.array([_check_length(sample, seq_len) for sample in dataset])
    plan = EpochPlan(len(dataset), global_batch, seed=seed, shuffle=shuffle, drop_remainder=drop_remainder,
                     lengths=lengths, seq_len=seq_len)
    build = functools.partial(_token_rows, dataset=dataset, shard_index=shard_index, batch_size=batch_size,
                              seq_len=seq_len, pad_id=pad_id)
    settings = dict(num_samples=len(dataset), global_batch_size=global_batch, seq_len=seq_len, seed=seed,
                    shuffle=shuffle, num_epochs=num_epochs, packing=packing, drop_remainder=drop_remainder)
    return BatchIterator(plan, build, settings, num_epochs)
