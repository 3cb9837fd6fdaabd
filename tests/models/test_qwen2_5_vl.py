"""Qwen2.5-VL: vision tower, full logits, M-RoPE positions, checkpoint round trip and cached greedy decoding match
transformers on a tiny random model (float32): images of different sizes in one call, window attention and full
attention blocks, right- and left-padded rows."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from automodel_jax import AutoModelForCausalLM
from automodel_jax.checkpoint.hf import hf_name, load_pretrained, save_pretrained
from automodel_jax.models.attention import AttentionInputs
from automodel_jax.models.params import flatten, pure_dict
from automodel_jax.models.qwen2_5_vl import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, VisionInputs,
                                             rope_index, vision_inputs)

IMAGE, VIDEO, START, END, PAD = 120, 121, 122, 123, 0
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, pad_token_id=PAD,
            bos_token_id=1, eos_token_id=None,
            rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=100.0))
# window_size 16 / patch 4 / merge 2: windows of 2 x 2 merged tokens; blocks 0, 1, 3 windowed, block 2 full.
VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, temporal_patch_size=2,
              spatial_merge_size=2, window_size=16, out_hidden_size=64, fullatt_block_indexes=[2],
              initializer_range=0.1)
PATCH_DIM = 3 * 2 * 4 * 4
# (t, h, w) in patches: merged grids 3 x 4, 2 x 3, 4 x 2, 2 x 2 (12, 6, 8, 4 image tokens).
GRIDS = np.array([[1, 6, 8], [1, 4, 6], [1, 8, 4], [1, 4, 4]])


def _hf_config(**top):
    return transformers.Qwen2_5_VLConfig(text_config=dict(TEXT), vision_config=dict(VISION), image_token_id=IMAGE,
                                         video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
                                         **top)


@pytest.fixture
def hf_vl(tmp_path):
    """(torch HF Qwen2_5_VLForConditionalGeneration in eval mode, its checkpoint dir) with noisy norms and biases."""
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(_hf_config()).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    path = tmp_path / "ckpt"
    hf.save_pretrained(path)
    return hf, path


def _image(grid):
    return [START] + [IMAGE] * (int(np.prod(grid)) // 4) + [END]


def _batch(left_pad_row=True):
    """Rows: two images; one image then right padding; (optionally) left padding then one image. Ends with text."""
    rows = [[5, 6] + _image(GRIDS[0]) + [7, 8] + _image(GRIDS[1]) + [9, 10],
            [11] + _image(GRIDS[2]) + [12, 13, 14]]
    if left_pad_row:
        rows.append([16] + _image(GRIDS[3]) + [17, 18])
    grids = GRIDS[:len(rows) + 1]
    length = max(map(len, rows))
    ids, mask = np.full((len(rows), length), PAD), np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        at = slice(length - len(row), None) if i == 2 else slice(0, len(row))
        ids[i, at], mask[i, at] = row, 1
    pixels = np.random.RandomState(0).randn(int(grids.prod(axis=1).sum()), PATCH_DIM).astype(np.float32)
    return ids, mask, pixels, grids


def _hf_inputs(ids, mask, pixels, grids):
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))


@nnx.jit
def _logits(model, ids, mask, pixels, vision, positions):
    return model(ids, mask, pixel_values=pixels, vision=vision, positions=positions)


def test_vision_tower_matches_hf(hf_vl):
    hf, path = hf_vl
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration)
    grids = GRIDS[:2]  # two images of different sizes in one flat sequence
    pixels = np.random.RandomState(1).randn(int(grids.prod(axis=1).sum()), PATCH_DIM).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    features = nnx.jit(lambda m, p, v: m.image_features(p, v))
    out = np.asarray(features(model, pixels, vision_inputs(grids, model.config)))
    assert out.shape == ref.shape == (18, 64)
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # Padding the patch sequence to a fixed length keeps the real features.
    padded = np.concatenate([pixels, np.random.RandomState(2).randn(16, PATCH_DIM).astype(np.float32)])
    out_padded = np.asarray(features(model, padded, vision_inputs(grids, model.config, num_patches=len(padded))))
    np.testing.assert_allclose(out_padded[:18], ref, atol=1e-4, rtol=0)


def test_window_layout_matches_transformers():
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index
    cfg = Qwen2_5_VLConfig.from_hf(_hf_config().to_dict())
    grids = np.array([[1, 6, 8], [2, 4, 6], [1, 10, 4]])
    ours = vision_inputs(grids, cfg)
    index, cu_windows = get_vision_window_index(torch.tensor(grids), 2, 16, 4)
    np.testing.assert_array_equal(ours.window_index, index.numpy())
    np.testing.assert_array_equal(ours.reverse_index, np.argsort(index.numpy()))
    bounds = np.flatnonzero(np.diff(ours.window_segments)) + 1
    np.testing.assert_array_equal(np.concatenate([[0], bounds, [len(ours.window_segments)]]), cu_windows.numpy())
    bounds = np.flatnonzero(np.diff(ours.full_segments)) + 1
    np.testing.assert_array_equal(np.concatenate([[0], bounds, [len(ours.full_segments)]]),
                                  get_vision_cu_seqlens(torch.tensor(grids)).numpy())
    pos = get_vision_position_ids(torch.tensor(grids), 2).numpy().reshape(-1, 4, 2)[index.numpy()].reshape(-1, 2)
    np.testing.assert_array_equal(ours.positions, pos.T)


def test_logits_and_rope_index_match_hf(hf_vl):
    hf, path = hf_vl
    model = AutoModelForCausalLM.from_pretrained(path)
    ids, mask, pixels, grids = _batch()
    inputs = _hf_inputs(ids, mask, pixels, grids)
    with torch.no_grad():
        ref = hf(**inputs).logits.numpy()
        ref_pos, ref_deltas = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                      image_grid_thw=inputs["image_grid_thw"],
                                                      attention_mask=inputs["attention_mask"])
    positions, deltas = rope_index(ids, grids, mask, model.config)
    np.testing.assert_array_equal(positions, ref_pos.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy())
    assert (positions[0] != positions[1]).any()  # M-RoPE components differ on image tokens
    real = mask.astype(bool)
    out = np.asarray(_logits(model, ids, mask, pixels, vision_inputs(grids, model.config), positions))
    assert np.abs(ref[real]).max() > 0.5  # logits large enough for the tolerance to mean something
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
    # The public call computes positions and vision inputs on the host (here while tracing, from the numpy
    # constants the function closes over: one compile instead of many eager ops).
    public = nnx.jit(lambda m, p: m(ids, mask, pixel_values=p, image_grid_thw=grids))
    np.testing.assert_allclose(np.asarray(public(model, pixels))[real], ref[real], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="image tokens but image_grid_thw describes"):
        model(ids, mask, pixel_values=pixels[:-16], image_grid_thw=grids[:-1])


def test_text_only_logits_match_hf(hf_vl):
    hf, path = hf_vl
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = np.random.RandomState(3).randint(0, 100, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, i: m(i))(model, ids)), ref, atol=1e-4, rtol=0)


def test_export_round_trip(hf_vl, tmp_path):
    hf, path = hf_vl
    model = load_pretrained(path)
    source = load_file(path / "model.safetensors")
    ours = {hf_name(p)[0] for p in flatten(pure_dict(model, nnx.Param))}
    assert ours == set(source)  # visual.*, model.layers.*, model.embed_tokens, model.norm, lm_head
    out = tmp_path / "export"
    save_pretrained(model, out)
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == source.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and np.array_equal(exported[name], tensor), name
    assert json.loads((out / "config.json").read_text()) == json.loads((path / "config.json").read_text())
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    inputs = _hf_inputs(*_batch(left_pad_row=False))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(**inputs).logits.numpy(), hf(**inputs).logits.numpy())


def test_cached_greedy_generation_matches_hf_generate(hf_vl):
    hf, path = hf_vl
    model = AutoModelForCausalLM.from_pretrained(path)
    ids, mask, pixels, grids = _batch()
    ids, mask = ids[[0, 2]], mask[[0, 2]]  # a full row and a left-padded one
    grids = GRIDS[[0, 1, 3]]
    pixels = np.random.RandomState(0).randn(int(grids.prod(axis=1).sum()), PATCH_DIM).astype(np.float32)
    new = 8
    with torch.no_grad():
        ref = hf.generate(**_hf_inputs(ids, mask, pixels, grids), max_new_tokens=new, do_sample=False,
                          pad_token_id=PAD)[:, ids.shape[1]:].numpy()
    graphdef, state = nnx.split(model)
    traces = []

    @jax.jit
    def step(state, tokens, mask, cache, pixels=None, vision=None, positions=None):
        traces.append(tokens.shape)
        logits, cache = nnx.merge(graphdef, state)(tokens, mask, pixel_values=pixels, vision=vision,
                                                   positions=positions, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    positions, _ = rope_index(ids, grids, mask, model.config)
    cache = model.init_cache(2, ids.shape[1] + new)
    token, cache = step(state, ids, mask, cache, pixels, vision_inputs(grids, model.config), positions)
    out = [token]
    for _ in range(new - 1):
        token, cache = step(state, token[:, None], jnp.ones((2, 1), jnp.int32), cache)
        out.append(token)
    np.testing.assert_array_equal(np.stack([np.asarray(t) for t in out], axis=1), ref)
    assert len(traces) == 2
    # Decoded tokens continue after each row's largest M-RoPE position (HF's rope deltas).
    last = positions.max(axis=(0, 2))
    fed = np.asarray(cache.positions)[:, ids.shape[1]:ids.shape[1] + new - 1]  # the last token is never fed back
    np.testing.assert_array_equal(fed, last[:, None] + 1 + np.arange(new - 1))


def test_remat_keeps_loss_and_gradients_through_the_vision_tower(hf_vl):
    """The training entry point: hidden_states with precomputed vision inputs and M-RoPE positions [3, B, T]."""
    _, path = hf_vl
    ids, mask, pixels, grids = _batch(left_pad_row=False)
    grids = grids[:3]
    pixels = pixels[:int(grids.prod(axis=1).sum())]
    vision = vision_inputs(grids, Qwen2_5_VLConfig.from_hf(_hf_config().to_dict()))

    def loss_and_grads(remat):
        model = AutoModelForCausalLM.from_pretrained(path, remat=remat)
        positions = jnp.asarray(model.rope_index(ids, grids, mask)[0])

        def loss(m):
            inputs = AttentionInputs.build(jnp.asarray(ids), jnp.asarray(mask), positions=positions)
            return jnp.mean(m.logits(m.hidden_states(jnp.asarray(ids), inputs, pixel_values=pixels,
                                                     vision=vision)) ** 2)
        return nnx.jit(nnx.value_and_grad(loss))(model)

    (loss, grads), (loss_remat, grads_remat) = loss_and_grads("none"), loss_and_grads("full")
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    grads, grads_remat = nnx.to_pure_dict(grads), nnx.to_pure_dict(grads_remat)
    assert float(jnp.abs(grads["visual"]["patch_embed"]["proj"]["kernel"]).max()) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4), grads, grads_remat)


def test_vision_inputs_is_a_pytree_and_config_reads_legacy_layout():
    cfg = Qwen2_5_VLConfig.from_hf(_hf_config().to_dict())
    v = vision_inputs(GRIDS[:2], cfg)
    assert isinstance(v, VisionInputs) and len(jax.tree.leaves(v)) == 5
    assert cfg.rope.mrope_section == (2, 3, 3) and cfg.vision.fullatt_block_indexes == (2,)
    assert cfg.image_token_id == IMAGE and cfg.qkv_bias and cfg.head_dim == 16
    # transformers 4 wrote the text fields flat, with rope_scaling {"type": "mrope"} and vision in_chans.
    flat = {**TEXT, "model_type": "qwen2_5_vl", "image_token_id": IMAGE, "rope_theta": 100.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "vision_config": {**VISION, "in_chans": 3}}
    del flat["rope_parameters"]
    legacy = Qwen2_5_VLConfig.from_hf(flat)
    assert legacy.rope == cfg.rope and legacy.vision == cfg.vision


@pytest.mark.parametrize("change, message", [
    (dict(text_config=dict(TEXT, rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 4]))),
     r"mrope_section \[2, 3, 4\] sums to 9 but head_dim / 2 is 8"),
    (dict(text_config=dict(TEXT, rope_parameters=dict(rope_type="yarn", factor=2.0, mrope_section=[2, 3, 3]))),
     r"rope type 'yarn' is not supported for qwen2_5_vl"),
    (dict(text_config=dict(TEXT, use_sliding_window=True, sliding_window=4)), r"use_sliding_window is not supported"),
    (dict(vision_config=dict(VISION, hidden_act="quick_gelu")), r"vision_config.hidden_act 'quick_gelu'"),
    (dict(vision_config=dict(VISION, window_size=4)), r"window_size 4 must be at least"),
    (dict(vision_config=dict(VISION, out_hidden_size=48)), r"out_hidden_size 48 must equal the text hidden_size 64"),
    (dict(vision_config=dict(VISION, fullatt_block_indexes=[4])), r"fullatt_block_indexes entry 4"),
])
def test_unsupported_config_values_are_clear_errors(change, message):
    hf = {**_hf_config().to_dict(), "model_type": "qwen2_5_vl"}
    hf.update(change)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_config(hf)


MAX_PATCHES = 80  # row 0: 48 + 24 patches, row 1: 32


def _row_batch():
    """`_batch(left_pad_row=False)` in the VLM collator's per-row layout: row 0 two images of different sizes, row 1
    one image then right padding; max_images 3, max_patches 80, 3 more padding slots. Also returns the flat batch."""
    from automodel_jax.data.vlm_batches import VLMCollator
    flat = _batch(left_pad_row=False)
    ids, mask, pixels, grids = flat
    samples, first_patch, first_image = [], 0, 0
    for r, count in enumerate([2, 1]):
        n, row_grids = int(mask[r].sum()), grids[first_image:first_image + count]
        patches = int(row_grids.prod(axis=1).sum())
        labels = np.where(ids[r, :n] == IMAGE, -100, np.roll(ids[r, :n], -1))
        samples.append(dict(input_ids=ids[r, :n], labels=labels, token_type_ids=(ids[r, :n] == IMAGE).astype(int),
                            pixel_values=pixels[first_patch:first_patch + patches], image_grid_thw=row_grids))
        first_patch, first_image = first_patch + patches, first_image + count
    collate = VLMCollator(model_type="qwen2_5_vl", seq_len=ids.shape[1] + 3, max_images=3, pad_id=PAD,
                          pixel_shape=(PATCH_DIM,), max_patches=MAX_PATCHES)
    return collate(samples), flat


def _row_logits(model, batch):
    inputs = AttentionInputs(batch["segment_ids"], batch["positions"])
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "segment_ids", "positions")}
    return model.logits(model.hidden_states(batch["input_ids"], inputs, **extra))


def test_per_row_batch_matches_flat_call_and_trains(hf_vl):
    """host_batch + hidden_states on the collator's per-row layout (each row its own padded vision sequence,
    positions [B, 3, S]) inside jit give the flat public call's logits on real tokens, and gradients are finite."""
    _, path = hf_vl
    model = AutoModelForCausalLM.from_pretrained(path)
    collated, (ids, mask, pixels, grids) = _row_batch()
    batch = Qwen2_5_VLForConditionalGeneration.host_batch(model.config, collated)
    b, s, p = 2, ids.shape[1] + 3, MAX_PATCHES
    assert {k: v.shape for k, v in batch.items()} == {
        "input_ids": (b, s), "labels": (b, s), "segment_ids": (b, s), "positions": (b, 3, s),
        "pixel_values": (b, p, PATCH_DIM), "vision_window_index": (b, p // 4), "vision_reverse_index": (b, p // 4),
        "vision_positions": (b, 2, p), "vision_window_segments": (b, p), "vision_full_segments": (b, p)}
    real = mask.astype(bool)
    flat_positions = rope_index(ids, grids, mask, model.config)[0]
    np.testing.assert_array_equal(batch["positions"][:, :, :ids.shape[1]].transpose(1, 0, 2)[:, real],
                                  flat_positions[:, real])
    out = np.asarray(nnx.jit(_row_logits)(model, batch))
    flat = nnx.jit(lambda m, px: m(ids, mask, pixel_values=px, image_grid_thw=grids))(model, pixels)
    np.testing.assert_allclose(out[:, :ids.shape[1]][real], np.asarray(flat)[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=rf"positions \[B, 3, T\] = \[2, 3, {s}\] .*; got \[3, 2, {s}\]"):
        _row_logits(model, dict(batch, positions=batch["positions"].transpose(1, 0, 2)))  # rope_index's layout

    def loss(m, batch):
        logp = jax.nn.log_softmax(_row_logits(m, batch), axis=-1)
        labels = batch["labels"]
        nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(labels >= 0, nll, 0)) / jnp.sum(labels >= 0)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model, batch)
    leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
    assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert float(jnp.abs(grads["visual"]["patch_embed"]["proj"]["kernel"][...]).max()) > 0


def test_host_batch_rejects_mismatched_images():
    cfg = Qwen2_5_VLConfig.from_hf(_hf_config().to_dict())
    collated, _ = _row_batch()
    collated["image_mask"][1, 1] = True
    collated["image_grid_thw"][1, 1] = GRIDS[3]
    with pytest.raises(ValueError, match=r"batch row 1: 8 image tokens \(id 120\) but its image_grid_thw "
                                         r"\[\[1, 8, 4\], \[1, 4, 4\]\] describes 12 image features"):
        Qwen2_5_VLForConditionalGeneration.host_batch(cfg, collated)


def test_per_row_batch_sharded_over_eight_devices_matches_one_device():
    """8 rows of 0-2 images, batch axis over data x fsdp = 8 simulated devices (vlm_batch_program.py)."""
    from vlm_batch_program import run  # tests/models is on sys.path (pytest prepend import mode)
    record = run("qwen2_5_vl")
    assert record["devices"] == 8 and record["finite"] and record["spec"] == "(('data', 'fsdp'),)"
    assert record["max_diff"] < 1e-5
