"""Packed sequences never attend across samples: per-sample losses of a packed batch (from the real loader, with
segment ids and restarting positions) equal those of the same samples run one per row, unpacked."""
import jax
import jax.numpy as jnp
import numpy as np

from automodel_jax import AutoModelForCausalLM
from automodel_jax.data import make_loader

CFG = dict(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _token_losses(model, batch):
    logits = model(jnp.asarray(batch["input_ids"]), positions=jnp.asarray(batch["positions"]),
                   segment_ids=jnp.asarray(batch["segment_ids"]))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = np.asarray(batch["labels"])
    picked = np.take_along_axis(np.asarray(logp), np.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return picked, labels


def test_packed_losses_equal_unpacked():
    rng = np.random.default_rng(0)
    samples = []
    for length in (5, 9, 3, 12, 7, 4, 6, 10):
        ids = rng.integers(0, 97, length + 1).astype(np.int32)
        labels = ids[1:].copy()
        labels[: length // 3] = -100
        samples.append(dict(input_ids=ids[:-1], labels=labels))
    model = AutoModelForCausalLM.from_config(CFG, seed=1)
    packed = next(iter(make_loader(samples, batch_size=2, seq_len=24, pad_id=0, seed=0, shuffle=False,
                                   packing=True, num_epochs=1)))
    assert packed["segment_ids"].max() >= 3  # several samples share a row
    picked, labels = _token_losses(model, packed)
    seen = 0
    for row in range(packed["input_ids"].shape[0]):
        for seg in range(1, packed["segment_ids"][row].max() + 1):
            where = packed["segment_ids"][row] == seg
            ids = packed["input_ids"][row][where]
            match = [s for s in samples if len(s["input_ids"]) == len(ids) and (s["input_ids"] == ids).all()]
            assert len(match) == 1
            alone = dict(input_ids=ids[None], labels=match[0]["labels"][None], segment_ids=np.ones((1, len(ids)), int),
                         positions=np.arange(len(ids))[None])
            want, want_labels = _token_losses(model, alone)
            np.testing.assert_array_equal(labels[row][where], want_labels[0])
            mask = want_labels[0] != -100
            np.testing.assert_allclose(picked[row][where][mask], want[0][mask], atol=1e-5)
            seen += 1
    assert seen >= 4
