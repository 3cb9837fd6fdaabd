"""cuDNN attention (the path every GPU training step takes) against the exact XLA path, outputs and gradients.

On a GPU, `attention(impl="cudnn")` and `impl="auto"` run cuDNN's fused attention for bf16/fp16 rows that are
right-padded (valid lengths) or packed with a `max_segments` bound (ragged offsets); everything cuDNN cannot take
(float32, left padding, packed rows without the bound, soft-capping) goes to XLA, which the routing tests check in the
compiled program. Packed batches give every sample the loss and gradients it has alone in a padded row. Compared
only where the result is defined: the outputs of real (non-padding) queries, and gradients of a loss over them; every
output, padding included, and every gradient must be finite (an all-padding row is what fills the last evaluation
batch).

The GPU tests need only pytest and the package (jax[cuda]); on a CPU they are skipped with one reason. The CPU tests
below them run the same comparisons of our XLA path against jax's own reference implementation, so the harness is
checked everywhere. On an H200: `pytest tests/models/test_attention_gpu.py -m gpu -v -rs`.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from automodel_jax import AutoModelForCausalLM
from automodel_jax.models import attention as attention_module
from automodel_jax.models.attention import (AttentionInputs, attention, attention_mask, bidirectional_attention,
                                            cudnn_segments, ragged_layout)
from automodel_jax.peft.lora import split_model
from automodel_jax.training.step import token_loss

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU: compares cuDNN attention "
                            "with XLA")
T, D = 128, 64
# Right-padded rows: full, partial, a single token, all padding.
LENGTHS = (128, 77, 1, 0)
# Relative tolerance (max |a - b| / max |b|) of two 16-bit implementations, float32 accumulation in both.
TOLERANCE = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3, jnp.float32: 1e-4}
WINDOWS = [None, 16]
HEADS = [(8, 8), (8, 2), (8, 1)]  # (query heads, kv heads): MHA, GQA, MQA


def qkv(batch: int, heads: int, kv_heads: int, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, T, heads, D), jnp.float32)
    k = jax.random.normal(keys[1], (batch, T, kv_heads, D), jnp.float32)
    v = jax.random.normal(keys[2], (batch, T, kv_heads, D), jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def right_padded(lengths) -> AttentionInputs:
    """Segment ids 1..1 0..0 and positions 0..n-1 then 0 per row, as the unpacked loader writes them."""
    real = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    return AttentionInputs(jnp.asarray(real, jnp.int32), jnp.asarray(np.where(real, np.arange(T), 0), jnp.int32),
                           max_segments=1)


def left_padded(lengths) -> AttentionInputs:
    """A generation-style batch: padding first, positions 0..T-1 (HF semantics, as AttentionInputs.build gives)."""
    mask = np.arange(T)[None, :] >= T - np.asarray(lengths)[:, None]
    return AttentionInputs.build(jnp.zeros((len(lengths), T), jnp.int32), jnp.asarray(mask, jnp.int32))


# Packed rows of sample lengths, as the packing loader fills them: several samples with padding after, one full
# sample, four samples including a one-token one, and an all-padding row.
PACKED_ROWS = ((40, 50, 30), (128,), (7, 1, 77, 20), ())


def packed(rows=PACKED_ROWS[:2], max_segments: int | None = None) -> AttentionInputs:
    """Rows of packed samples (segments 1..n, positions restarting per sample), trailing padding; `max_segments`
    promises the layout to cuDNN (None: no promise, the XLA path)."""
    segments, positions = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    for row, row_sizes in enumerate(rows):
        start = 0
        for segment, size in enumerate(row_sizes, 1):
            segments[row, start:start + size], positions[row, start:start + size] = segment, np.arange(size)
            start += size
    return AttentionInputs(jnp.asarray(segments), jnp.asarray(positions), max_segments=max_segments)


def outputs_and_grads(fn, q, k, v, real):
    """(output, (dq, dk, dv)) of fn(q, k, v); the gradients are of sum(output * fixed random cotangent) over real
    query slots, in float32."""
    cotangent = jax.random.normal(jax.random.key(7), q.shape, jnp.float32) * real[:, :, None, None]

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent)
    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return out, grads


def rel_err(actual, expected, where=None) -> float:
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    if where is not None:
        actual, expected = actual[where], expected[where]
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_same_attention(candidate, reference, q, k, v, segment_ids, tolerance):
    """Outputs on real queries and gradients agree within `tolerance`; everything candidate gives is finite."""
    real = np.asarray(segment_ids) != 0
    out, grads = outputs_and_grads(candidate, q, k, v, real)
    ref_out, ref_grads = outputs_and_grads(reference, q, k, v, real)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert np.isfinite(np.asarray(out, np.float32)).all(), "non-finite attention output (padding included)"
    assert rel_err(out, ref_out, real) < tolerance
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert np.isfinite(np.asarray(grad)).all(), f"non-finite {name}"
        assert rel_err(grad, ref_grad) < tolerance, name


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def program_text(fn, *args) -> str:
    """The compiled programs of fn and of its gradient (forward and backward), as text."""
    return compiled_text(fn, *args) + compiled_text(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)),
                                                             argnums=(0, 1, 2)), *args)


def uses_cudnn(text: str) -> bool:
    """Whether a compiled program calls cuDNN's fused attention."""
    return "cudnn$fmha" in text


def ours(impl, inputs, **kw):
    return lambda q, k, v: attention(q, k, v, inputs, impl=impl, **kw)


# ---------------------------------------------------------------- GPU: cuDNN against XLA

@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("heads, kv_heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("window", WINDOWS, ids=["causal", "sliding16"])
@pytest.mark.parametrize("impl", ["cudnn", "auto"])
@pytest.mark.parametrize("layout", ["right_padded", "packed"])
def test_cudnn_matches_xla(layout, impl, window, heads, kv_heads, dtype):
    """GQA/MQA, sliding window, forward, dq, dk, dv, on right-padded rows (a one-token row, an all-padding row) and
    on packed rows with a bound above the most samples a row holds (several samples, a one-token sample, a full row,
    an all-padding row: cuDNN's ragged layout). Neither program holds a [.., T, T] score or mask array."""
    inputs = right_padded(LENGTHS) if layout == "right_padded" else packed(PACKED_ROWS, max_segments=6)
    q, k, v = qkv(inputs.segment_ids.shape[0], heads, kv_heads, dtype)
    fused = ours(impl, inputs, sliding_window=window)
    text = program_text(fused, q, k, v)
    assert uses_cudnn(text) and f",{T},{T}]" not in text, "no cuDNN, or a [.., T, T] scores or mask array"
    assert_same_attention(fused, ours("xla", inputs, sliding_window=window), q, k, v, inputs.segment_ids,
                          TOLERANCE[dtype])


@pytest.mark.gpu
@on_gpu
def test_all_padding_row_gives_finite_zero_gradients():
    """A row without tokens (the padding rows of a short last batch) neither poisons nor feeds the gradients."""
    q, k, v = qkv(2, 8, 2, jnp.bfloat16)
    inputs = right_padded((T, 0))
    _, grads = outputs_and_grads(ours("cudnn", inputs), q, k, v, np.asarray(inputs.segment_ids) != 0)
    for grad in grads:
        grad = np.asarray(grad, np.float32)
        assert np.isfinite(grad).all() and not grad[1].any() and grad[0].any()


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("case", ["float32", "left_padded", "packed", "softcap"])
def test_layouts_cudnn_cannot_take_run_on_xla_under_auto(case):
    """'auto' sends to XLA what the cuDNN call cannot express, with XLA's exact result; 'cudnn' refuses those it
    cannot run at all (float32, soft-capping) with a clear error."""
    dtype = jnp.float32 if case == "float32" else jnp.bfloat16
    inputs = {"left_padded": left_padded((T, 77, 1)), "packed": packed(),  # no max_segments: no layout promise
              }.get(case, right_padded((T, 77, 1)))
    kw = dict(softcap=20.0) if case == "softcap" else {}
    q, k, v = qkv(inputs.segment_ids.shape[0], 8, 2, dtype)
    assert not uses_cudnn(program_text(ours("auto", inputs, **kw), q, k, v))
    np.testing.assert_array_equal(np.asarray(jax.jit(ours("auto", inputs, **kw))(q, k, v), np.float32),
                                  np.asarray(jax.jit(ours("xla", inputs, **kw))(q, k, v), np.float32))
    if case in ("float32", "softcap"):
        with pytest.raises(ValueError, match="implementation 'cudnn' needs"):
            ours("cudnn", inputs, **kw)(q, k, v)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_vision_encoder_attention_matches_xla(dtype):
    """Non-causal attention of the vision towers (SigLIP, Qwen2.5-VL without windows) takes cuDNN too."""
    q, k, v = qkv(2, 8, 8, dtype)

    def fused(q, k, v):
        return bidirectional_attention(q, k, v, impl="cudnn")
    assert uses_cudnn(program_text(fused, q, k, v))
    assert_same_attention(fused, lambda q, k, v: bidirectional_attention(q, k, v, impl="xla"), q, k, v,
                          jnp.ones((2, T), jnp.int32), TOLERANCE[dtype])


# Tiny decoders of the families whose attention differs: GQA (Llama), sliding window (Mistral), soft-capped
# attention and final logits (Gemma 2, which runs on XLA throughout). Head dim 64 as real models have.
FAMILIES = {
    "llama_gqa": dict(model_type="llama"),
    "mistral_sliding": dict(model_type="mistral", sliding_window=16),
    "gemma2_softcap": dict(model_type="gemma2", head_dim=64, query_pre_attn_scalar=64, sliding_window=16,
                           attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}
TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=T, rms_norm_eps=1e-5,
            tie_word_embeddings=False)


def model_loss_and_grads(family: str, impl: str, batch: dict):
    """(mean token loss, gradients of every parameter, compiled text) of a bf16-compute, float32-parameter model."""
    model = AutoModelForCausalLM.from_config({**TINY, **FAMILIES[family]}, dtype=jnp.bfloat16,
                                             param_dtype=jnp.float32, seed=0, attention_impl=impl)
    graphdef, params, frozen = split_model(model, lora=False)

    def loss(params):
        total, count = token_loss(graphdef, params, frozen, batch, loss_impl="chunked", max_segments=1)
        return total / count
    grad_fn = jax.jit(jax.value_and_grad(loss))
    value, grads = grad_fn(params)
    return float(value), grads, grad_fn.lower(params).compile().as_text()


def token_batch(lengths) -> dict:
    real = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    ids = np.random.default_rng(0).integers(1, TINY["vocab_size"], real.shape)
    return dict(input_ids=jnp.asarray(np.where(real, ids, 0), jnp.int32),
                labels=jnp.asarray(np.where(real, np.roll(ids, -1, axis=1), -100), jnp.int32),
                segment_ids=jnp.asarray(real, jnp.int32),
                positions=jnp.asarray(np.where(real, np.arange(T), 0), jnp.int32))


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_loss_and_gradients_match_xla(family):
    """A train step's loss and every parameter gradient with the default attention ('auto': cuDNN where it applies)
    equal the XLA path's, on right-padded rows including an all-padding one."""
    batch = token_batch(LENGTHS)
    loss, grads, text = model_loss_and_grads(family, "auto", batch)
    ref_loss, ref_grads, _ = model_loss_and_grads(family, "xla", batch)
    assert uses_cudnn(text) == (family != "gemma2_softcap")
    assert np.isfinite(loss) and abs(loss - ref_loss) < TOLERANCE[jnp.bfloat16] * abs(ref_loss)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)
    for (path, grad), ref_grad in zip(flat, ref_flat):
        assert np.isfinite(np.asarray(grad)).all(), jax.tree_util.keystr(path)
        assert rel_err(grad, ref_grad) < 5e-2, jax.tree_util.keystr(path)


# Per-sample losses: relative |packed - padded| / |padded|. bf16: the suite's bound for two 16-bit paths (above);
# each keeps 8 significant bits (rounding 2^-9) through ~10 roundings a layer, rounded at different points by the
# ragged and the padded kernel. float32: XLA on both sides, whose float32 matmuls on a GPU run as TF32 (10-bit
# mantissa, 2^-11 = 4.9e-4) in differently shaped batches. Gradients: max |a - b| / max |b| per parameter.
LOSS_TOLERANCE = {jnp.bfloat16: 2e-2, jnp.float32: 1e-3}
GRAD_TOLERANCE = {jnp.bfloat16: 5e-2, jnp.float32: 5e-3}


def sample_batch(rows, vocab_size: int) -> tuple[dict, AttentionInputs, np.ndarray]:
    """(tokens and labels, attention inputs, sample index of each slot or -1) of `rows` of sample lengths, each
    sample's tokens drawn from its own seed (so the same sample has the same tokens in any layout), labels the next
    token within the sample."""
    inputs = packed(rows)
    ids, labels, sample_of = (np.zeros((len(rows), T), np.int32) for _ in range(3))
    labels[:], sample_of[:] = -100, -1
    sample = 0
    for row, row_sizes in enumerate(rows):
        start = 0
        for size in row_sizes:
            tokens = np.random.default_rng(sample).integers(1, vocab_size, size)
            ids[row, start:start + size], sample_of[row, start:start + size] = tokens, sample
            labels[row, start:start + size - 1] = tokens[1:]
            start, sample = start + size, sample + 1
    return dict(input_ids=jnp.asarray(ids), labels=jnp.asarray(labels)), inputs, sample_of


def per_sample_losses(family: str, dtype, impl: str, rows, max_segments: int):
    """(mean token loss of each sample with a label [n], gradients of their summed token losses, compiled text) of a
    tiny `family` model computing in `dtype` (float32 parameters) on `rows`; max_segments 1 = right-padded rows."""
    model = AutoModelForCausalLM.from_config({**TINY, **FAMILIES[family]}, dtype=dtype, param_dtype=jnp.float32,
                                             seed=0, attention_impl=impl)
    cap = model.logit_softcap
    graphdef, params, frozen = split_model(model, lora=False)
    batch, inputs, sample_of = sample_batch(rows, TINY["vocab_size"])
    inputs = AttentionInputs(inputs.segment_ids, inputs.positions, max_segments=max_segments)
    n = int(sample_of.max()) + 1
    owner = jnp.asarray(np.where(sample_of < 0, n, sample_of).ravel())

    def losses(params):
        model = nnx.merge(graphdef, params, frozen)
        hidden, kernel = model.output_head(model.hidden_states(batch["input_ids"], inputs))
        logits = jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
        logits = logits if cap is None else cap * jnp.tanh(logits / cap)
        labels = batch["labels"]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(labels, 0)[..., None], -1)[..., 0]
        nll, counted = jnp.where(labels != -100, nll, 0.0), (labels != -100).astype(jnp.float32)
        sums = jax.ops.segment_sum(nll.ravel(), owner, num_segments=n + 1)[:n]
        counts = jax.ops.segment_sum(counted.ravel(), owner, num_segments=n + 1)[:n]
        return jnp.sum(sums), (sums, counts)
    grad_fn = jax.jit(jax.value_and_grad(losses, has_aux=True))
    (_, (sums, counts)), grads = grad_fn(params)
    labelled = np.asarray(counts) > 0  # a one-token sample has nothing to predict
    return np.asarray(sums)[labelled] / np.asarray(counts)[labelled], grads, grad_fn.lower(params).compile().as_text()


def assert_packed_equals_unpacked(family: str, dtype, impl: str, expect_cudnn: bool):
    """Every sample's loss, and the gradients of the batch's summed loss, are the same packed (PACKED_ROWS, bound 6)
    as with one sample per right-padded row."""
    unpacked_rows = tuple((size,) for row in PACKED_ROWS for size in row)
    loss, grads, text = per_sample_losses(family, dtype, impl, PACKED_ROWS, max_segments=6)
    ref_loss, ref_grads, ref_text = per_sample_losses(family, dtype, impl, unpacked_rows, max_segments=1)
    assert uses_cudnn(text) == uses_cudnn(ref_text) == expect_cudnn
    assert loss.shape == (len(unpacked_rows) - 1,) == ref_loss.shape  # the one-token sample has no label
    assert np.isfinite(loss).all()
    np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_TOLERANCE[dtype])
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref_grads)
    for (path, grad), ref_grad in zip(flat, ref_flat):
        assert np.isfinite(np.asarray(grad)).all(), jax.tree_util.keystr(path)
        assert rel_err(grad, ref_grad) < GRAD_TOLERANCE[dtype], jax.tree_util.keystr(path)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_per_sample_losses_equal_unpacked(family, dtype):
    """Llama (GQA), Mistral (sliding window) on cuDNN in bf16; Gemma 2 (soft-capping) and float32 on XLA."""
    assert_packed_equals_unpacked(family, dtype, "auto",
                                  expect_cudnn=dtype == jnp.bfloat16 and family != "gemma2_softcap")


# ---------------------------------------------------------------- any backend: the same harness, XLA against jax's

@pytest.mark.parametrize("family", ["llama_gqa", "mistral_sliding"])
def test_packed_per_sample_losses_equal_unpacked_on_xla(family):
    assert_packed_equals_unpacked(family, jnp.float32, "xla", expect_cudnn=False)


@pytest.mark.parametrize("window", WINDOWS, ids=["causal", "sliding16"])
@pytest.mark.parametrize("max_segments", [4, 6, 2])
def test_ragged_layout_describes_the_segment_mask(window, max_segments):
    """cuDNN's view of packed rows (causal within [offset, offset + length) of each of the first max_segments runs,
    window in slots) is `attention_mask` (segments, positions restarting per sample) on every covered query; with a
    bound below a row's run count, the later runs are left out of `covered`."""
    inputs = packed(PACKED_ROWS)
    lengths, offsets, covered = (np.asarray(x) for x in ragged_layout(inputs.segment_ids, max_segments))
    assert lengths.shape == (len(PACKED_ROWS), max_segments) and offsets.shape == (len(PACKED_ROWS), max_segments + 1)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    expected = np.asarray(attention_mask(inputs.segment_ids, inputs.segment_ids, inputs.positions, inputs.positions,
                                         sliding_window=window))[:, 0]
    for row, sizes in enumerate(PACKED_ROWS):
        kept = sizes[:max_segments]
        np.testing.assert_array_equal(lengths[row], list(kept) + [-1] * (max_segments - len(kept)))
        np.testing.assert_array_equal(offsets[row], list(np.cumsum((0,) + kept[:-1]))[:len(kept)]
                                      + [-1] * (max_segments + 1 - len(kept)))
        assert covered[row].sum() == sum(kept) and covered[row, :sum(kept)].all()
        mask = np.zeros((T, T), bool)
        for start, size in zip(offsets[row], lengths[row]):
            if size > 0:
                inside = (i >= start) & (i < start + size) & (j >= start) & (j <= i)
                mask |= inside & ((i - j < window) if window else True)
        np.testing.assert_array_equal(mask[covered[row]], expected[row][covered[row]])


def test_cudnn_segments_picks_the_fused_layout_or_xla(caplog, monkeypatch):
    """Which rows cuDNN takes, decided on any backend (as on a GPU): valid lengths for right-padded rows, ragged for
    packed ones with a bound; XLA otherwise, with one log line per reason on a GPU; 'cudnn' refuses what it cannot
    run."""
    bf16, rows = jnp.bfloat16, packed(PACKED_ROWS, max_segments=6)
    gpu = dict(impl="auto", backend="gpu")
    monkeypatch.setattr(attention_module, "_logged_fallbacks", set())  # what earlier tests logged
    assert cudnn_segments(right_padded(LENGTHS), bf16, None, **gpu) == 1
    assert cudnn_segments(rows, bf16, None, **gpu) == 6
    assert cudnn_segments(rows, bf16, None, impl="cudnn", backend="gpu") == 6
    assert cudnn_segments(packed(PACKED_ROWS), bf16, None, **gpu) is None  # no bound: no layout promise
    assert cudnn_segments(rows, bf16, None, impl="xla", backend="gpu") is None
    assert cudnn_segments(rows, bf16, None, impl="auto", backend="cpu") is None
    with_blocks = AttentionInputs(rows.segment_ids, rows.positions, bidirectional_ids=rows.segment_ids,
                                  max_segments=6)
    assert cudnn_segments(with_blocks, bf16, None, **gpu) is None
    with caplog.at_level(logging.WARNING, logger="automodel_jax.models.attention"):
        for _ in range(3):
            assert cudnn_segments(rows, bf16, 50.0, **gpu) is None
            assert cudnn_segments(rows, jnp.float32, None, **gpu) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == len(set(lines)) == 2 and all("packed rows take the XLA path" in line for line in lines)
    assert "soft-capping 50.0" in lines[0] and "dtype float32" in lines[1]
    for dtype, softcap in ((jnp.float32, None), (bf16, 50.0)):
        with pytest.raises(ValueError, match="implementation 'cudnn' needs a GPU and bf16/fp16"):
            cudnn_segments(rows, dtype, softcap, impl="cudnn", backend="gpu")



def jax_reference(lengths, window: int | None):
    """jax's own attention (implementation 'xla') with per-row valid lengths: the semantics cuDNN is given."""
    lengths = jnp.asarray(lengths, jnp.int32)
    return lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        local_window_size=None if window is None else (window - 1, 0), implementation="xla")


@pytest.mark.parametrize("window", WINDOWS, ids=["causal", "sliding16"])
def test_xla_path_matches_jax_reference_on_right_padded_rows(window):
    q, k, v = qkv(len(LENGTHS), 8, 2, jnp.float32)
    inputs = right_padded(LENGTHS)
    assert_same_attention(ours("xla", inputs, sliding_window=window), jax_reference(LENGTHS, window), q, k, v,
                          inputs.segment_ids, TOLERANCE[jnp.float32])
