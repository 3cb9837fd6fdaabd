"""The grain loader on real HellaSwag samples: layout, epochs, determinism, sharding, exact resume, packing."""
import itertools
import json
from collections import Counter

import numpy as np
import pytest

from automodel_jax.data import IGNORE, DataError, build_dataset, make_loader
from reference import DATA

HELLASWAG = DATA / "hellaswag" / "validation.jsonl"
SEQ_LEN, PAD = 256, 2


@pytest.fixture(scope="module")
def dataset(tokenizer):
    """37 real samples of 30-140 tokens: an odd count, so batches do not divide it."""
    return build_dataset(dict(kind="hellaswag", path=str(HELLASWAG), limit=37), tokenizer, SEQ_LEN, "drop")


def loader(dataset, **overrides):
    return make_loader(dataset, **{**dict(batch_size=4, seq_len=SEQ_LEN, pad_id=PAD, seed=7), **overrides})


def key(input_ids, labels):
    return tuple(input_ids.tolist()), tuple(labels.tolist())


def segments(batch):
    """Every sample in a batch, as the (input_ids, labels) key of the dataset sample it came from."""
    found = []
    for row in range(batch["input_ids"].shape[0]):
        for segment in range(1, batch["segment_ids"][row].max() + 1):
            where = batch["segment_ids"][row] == segment
            found.append(key(batch["input_ids"][row][where], batch["labels"][row][where]))
    return found


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])


@pytest.mark.parametrize("packing", [False, True])
def test_batch_layout(dataset, packing):
    batch = next(loader(dataset, packing=packing))
    assert set(batch) == {"input_ids", "labels", "segment_ids", "positions"}
    assert all(v.shape == (4, SEQ_LEN) and v.dtype == np.int32 for v in batch.values())
    pad = batch["segment_ids"] == 0
    assert pad.any() and (batch["input_ids"][pad] == PAD).all() and (batch["labels"][pad] == IGNORE).all()
    assert (batch["positions"][pad] == 0).all()
    for row in range(4):  # segments are 1..n in order, contiguous, and positions count from 0 in each
        ids = batch["segment_ids"][row]
        n = ids.max()
        assert (not packing and n == 1) or (packing and n >= 1)
        real = ids[ids > 0]
        assert (np.diff(real) >= 0).all() and set(real) == set(range(1, n + 1)) and (ids[len(real):] == 0).all()
        for segment in range(1, n + 1):
            np.testing.assert_array_equal(batch["positions"][row][ids == segment], np.arange((ids == segment).sum()))
    assert Counter(segments(batch)) <= Counter(key(s["input_ids"], s["labels"]) for s in dataset)


@pytest.mark.parametrize("packing", [False, True])
def test_one_epoch_yields_every_sample_once(dataset, packing):
    batches = list(loader(dataset, num_epochs=1, drop_remainder=False, packing=packing))
    assert Counter(s for b in batches for s in segments(b)) == Counter(key(s["input_ids"], s["labels"])
                                                                        for s in dataset)
    if not packing:
        assert len(batches) == 10 and (batches[-1]["segment_ids"][1:] == 0).all()  # 37 = 9 * 4 + 1
    else:
        assert len(batches) < 10  # several samples share a row


def test_drop_remainder_drops_the_short_last_batch(dataset):
    assert len(list(loader(dataset, num_epochs=2, drop_remainder=True))) == 74 // 4


def test_epochs_are_reshuffled_permutations(dataset):
    samples = [s for b in loader(dataset, batch_size=1, num_epochs=2) for s in segments(b)]
    first, second = samples[:37], samples[37:]
    assert Counter(first) == Counter(second) == Counter(key(s["input_ids"], s["labels"]) for s in dataset)
    assert first != second


def test_unshuffled_order_is_the_dataset_order(dataset):
    samples = [s for b in loader(dataset, batch_size=1, num_epochs=1, shuffle=False) for s in segments(b)]
    assert samples == [key(s["input_ids"], s["labels"]) for s in dataset]


@pytest.mark.parametrize("packing", [False, True])
def test_same_seed_same_batches_other_seed_other_order(dataset, packing):
    a, b = (list(itertools.islice(loader(dataset, packing=packing), 12)) for _ in range(2))
    assert_same_batches(a, b)
    c = list(itertools.islice(loader(dataset, seed=8, packing=packing), 12))
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


@pytest.mark.parametrize("packing", [False, True])
def test_shards_are_disjoint_slices_of_the_global_batch(dataset, packing):
    shards = [list(itertools.islice(loader(dataset, batch_size=2, shard_index=p, shard_count=3, packing=packing), 8))
              for p in range(3)]
    whole = list(itertools.islice(loader(dataset, batch_size=6, packing=packing), 8))
    for step, global_batch in enumerate(whole):
        stacked = {name: np.concatenate([shard[step][name] for shard in shards]) for name in global_batch}
        assert_same_batches([stacked], [global_batch])
    if not packing:  # 6 distinct samples per global batch (37 > 6): no sample is in two shards of a step
        for step in range(5):
            keys = [segments(shard[step]) for shard in shards]
            assert len(set().union(*keys)) == sum(len(k) for k in keys) == 6


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("taken", [3, 11])  # 11 batches of 4 cross the first epoch's end
def test_restored_state_continues_exactly(dataset, packing, taken):
    reference = list(itertools.islice(loader(dataset, packing=packing), taken + 6))
    first = loader(dataset, packing=packing)
    assert_same_batches(list(itertools.islice(first, taken)), reference[:taken])
    state = json.loads(json.dumps(first.get_state()))
    assert_same_batches(list(itertools.islice(first, 6)), reference[taken:])
    resumed = loader(dataset, packing=packing)
    resumed.set_state(state)
    assert_same_batches(list(itertools.islice(resumed, 6)), reference[taken:])


def test_state_resumes_another_process_layout_with_the_same_global_batch(dataset):
    one = loader(dataset, batch_size=4)
    list(itertools.islice(one, 5))
    state = one.get_state()
    expected = list(itertools.islice(one, 3))
    halves = [loader(dataset, batch_size=2, shard_index=p, shard_count=2) for p in range(2)]
    for half in halves:
        half.set_state(state)
    got = [{n: np.concatenate([b[n] for b in step]) for n in step[0]} for step in zip(*(itertools.islice(h, 3)
                                                                                        for h in halves))]
    assert_same_batches(got, expected)


def test_state_from_other_settings_is_rejected(dataset):
    state = loader(dataset).get_state()
    with pytest.raises(DataError, match="state was saved with settings .* restore with the same data, seed"):
        loader(dataset, seed=8).set_state(state)
    with pytest.raises(DataError, match="not a data loader state"):
        loader(dataset).set_state({"next_index": 3})


def test_sample_longer_than_seq_len_is_a_clear_error(dataset):
    longest = max(len(s["input_ids"]) for s in dataset)
    for packing in (False, True):
        with pytest.raises(DataError, match=f"more than the loader's seq_len {longest - 1}"):
            list(loader(dataset, seq_len=longest - 1, num_epochs=1, packing=packing))


@pytest.mark.parametrize("overrides, match", [
    (dict(shard_index=2, shard_count=2), r"shard_index must be in \[0, shard_count=2\), got 2"),
    (dict(batch_size=0), "batch_size and seq_len must be positive"),
    (dict(num_epochs=0), "num_epochs must be None"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*32\)"),
])
def test_bad_arguments(dataset, overrides, match):
    with pytest.raises(DataError, match=match):
        loader(dataset, **overrides)


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="the dataset is empty"):
        loader([])


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("processes", [1, 3])
def test_every_epoch_holds_each_sample_once_across_all_processes(dataset, packing, processes):
    """Each process builds its own loader (as on a multi-process run); together, each epoch's batches hold every
    sample exactly once, the processes' rows are disjoint, and batches_in_epochs counts the batches (in packed rows
    with packing: fewer than one sample per row)."""
    shards = [loader(dataset, batch_size=2, shard_index=p, shard_count=processes, packing=packing,
                     drop_remainder=False) for p in range(processes)]
    per_epoch = [shards[0].batches_in_epochs(e + 1) - shards[0].batches_in_epochs(e) for e in range(3)]
    unpacked = -(-37 // (2 * processes))
    assert per_epoch == [unpacked] * 3 if not packing else all(n < unpacked for n in per_epoch)
    everything = Counter(key(s["input_ids"], s["labels"]) for s in dataset)
    orders = []
    for count in per_epoch:
        epoch = [list(itertools.islice(shard, count)) for shard in shards]
        seen = Counter(s for shard in epoch for b in shard for s in segments(b))
        assert seen == everything
        orders.append([s for b in epoch[0] for s in segments(b)])
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_a_finite_loader_ends_after_its_epochs(dataset):
    for packing in (False, True):
        once = loader(dataset, num_epochs=2, packing=packing, drop_remainder=False)
        assert len(list(once)) == once.batches_in_epochs(2)


def test_an_epoch_without_a_whole_batch_is_a_clear_error(dataset):
    with pytest.raises(DataError, match="an epoch of 37 samples fills no whole global batch of 40 rows"):
        next(loader(dataset, batch_size=40, drop_remainder=True))


def test_max_segments_bounds_every_packed_row(dataset):
    """The static bound fused attention compiles for: no packed row of any epoch holds more samples; it is the most
    of the shortest samples that fit one row together; one sample a row unpacked."""
    packed = loader(dataset, packing=True, num_epochs=3, drop_remainder=False)
    bound = packed.plan.max_segments
    most = max(int(batch["segment_ids"][row].max()) for batch in packed for row in range(4))
    lengths = np.sort([len(sample["input_ids"]) for sample in dataset])
    assert 2 <= most <= bound and lengths[:bound].sum() <= SEQ_LEN < lengths[:bound + 1].sum()
    assert loader(dataset).plan.max_segments == 1
