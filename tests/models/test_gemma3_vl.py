"""Gemma 3 vision-language model: parity with transformers' Gemma3ForConditionalGeneration on tiny random configs
(vision tower, projector, full logits with several images, right padding and bidirectional image attention), the
checkpoint key layouts it loads, bit-exact export, and greedy generation with the KV cache."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from automodel_jax.checkpoint.hf import load_pretrained, save_pretrained
from automodel_jax.models.base import family_config
from automodel_jax.models.gemma3_vl import Gemma3ForConditionalGeneration, image_block_ids

IMAGE, BOI, EOI = 290, 288, 289
TOKENS_PER_IMAGE = 4
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, query_pre_attn_scalar=10,
            sliding_window=3, layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0,
            initializer_range=0.1)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, vision_use_head=False)


def _hf_model(path, *, tie=True, image_token=IMAGE, seed=0):
    """A tiny random transformers Gemma3ForConditionalGeneration saved to `path`; norms, biases and the (zero-
    initialised) projector weight get noise so that loading them wrongly shows."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=TOKENS_PER_IMAGE,
                                       image_token_index=image_token, boi_token_index=BOI, eoi_token_index=EOI,
                                       tie_word_embeddings=tie)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "mm_input_projection" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3_vl") / "ckpt"
    return _hf_model(path), path


def _image_run():
    return [BOI] + [IMAGE] * TOKENS_PER_IMAGE + [EOI]


def _batch(image_token=IMAGE, pad_to=20):
    """Two right-padded rows: the first with two images, the second with one and 6 padding slots; 3 images."""
    rng = np.random.RandomState(3)
    text = lambda n: list(rng.randint(3, 280, n))  # noqa: E731
    rows = [[2] + text(2) + _image_run() + text(2) + _image_run() + text(2),
            [2] + text(1) + _image_run() + text(5)]
    ids = np.zeros((2, pad_to), np.int64)
    mask = np.zeros((2, pad_to), np.int64)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = row, 1
    ids[ids == IMAGE] = image_token
    pixels = rng.randn(3, 3, 32, 32).astype(np.float32)
    return ids, mask, (ids == image_token).astype(np.int64), pixels


def _hf_logits(hf, ids, mask, token_type_ids, pixels):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                  token_type_ids=None if token_type_ids is None else torch.tensor(token_type_ids)).logits.numpy()


@nnx.jit
def _logits(model, ids, mask, pixels, token_type_ids):
    return model(ids, mask, pixel_values=pixels, token_type_ids=token_type_ids)


def test_vision_tower_matches_hf(hf_tied):
    hf, path = hf_tied
    model = load_pretrained(path)
    pixels = _batch()[3]
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
    out = nnx.jit(lambda m, x: m.vision_tower(x))(model, jnp.asarray(pixels))
    assert out.shape == (3, 16, 32)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


def test_projector_matches_hf(hf_tied):
    hf, path = hf_tied
    model = load_pretrained(path)
    patches = np.random.RandomState(0).randn(3, 16, 32).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.multi_modal_projector(torch.tensor(patches)).numpy()
    out = nnx.jit(lambda m, x: m.multi_modal_projector(x))(model, jnp.asarray(patches))
    assert out.shape == (3, TOKENS_PER_IMAGE, 64)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie, image_token", [(True, IMAGE), (False, 300)])  # 300 = vocab_size: out of vocabulary
def test_logits_match_hf_with_images_padding_and_bidirectional_blocks(tmp_path, tie, image_token):
    hf = _hf_model(tmp_path / "ckpt", tie=tie, image_token=image_token)
    model = load_pretrained(tmp_path / "ckpt")
    assert isinstance(model, Gemma3ForConditionalGeneration) and model.config.tie_word_embeddings == tie
    ids, mask, token_type_ids, pixels = _batch(image_token)
    real = mask.astype(bool)
    out = np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                             jnp.asarray(token_type_ids)))
    ref = _hf_logits(hf, ids, mask, token_type_ids, pixels)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
    # No image tokens marked (as HF without token_type_ids): causal everywhere, and different, so the blocks matter.
    causal = np.asarray(_logits(model, ids, mask, pixels, np.zeros_like(token_type_ids)))
    np.testing.assert_allclose(causal[real], _hf_logits(hf, ids, mask, None, pixels)[real], atol=1e-4, rtol=0)
    assert np.abs(causal[real] - out[real]).max() > 1e-2


def test_image_token_count_mismatch_is_a_clear_error(hf_tied):
    model = load_pretrained(hf_tied[1])
    ids, mask, token_type_ids, pixels = _batch()
    with pytest.raises(ValueError, match=r"8 image tokens \(id 290\) but 3 images x 4 tokens"):
        model(ids[1:].repeat(2, axis=0), pixel_values=pixels)


def test_image_block_ids_number_runs_per_row():
    types = np.array([[0, 1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1, 0]])
    np.testing.assert_array_equal(image_block_ids(types), [[0, 1, 1, 0, 2, 2, 0], [1, 1, 0, 0, 0, 2, 0]])


def _rewrite_keys(src, dst, rename):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    save_file({rename(k): v for k, v in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})


def _runtime_name(key):
    """transformers' in-memory names (its state_dict), which it also loads."""
    key = re.sub(r"^language_model\.model\.", "model.language_model.", key)
    key = re.sub(r"^language_model\.lm_head\.", "lm_head.", key)
    return re.sub(r"^(vision_tower|multi_modal_projector)\.", r"model.\1.", key)


@pytest.mark.parametrize("rename", [
    _runtime_name,
    lambda k: re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k),  # published Gemma 3 checkpoints
    lambda k: re.sub(r"^model\.vision_tower\.", "model.vision_tower.vision_model.", _runtime_name(k)),
], ids=["runtime", "published", "runtime_vision_model"])
def test_other_key_layouts_load_the_same_weights(tmp_path, hf_tied, rename):
    _, path = hf_tied
    _rewrite_keys(path, tmp_path / "renamed", rename)
    ours, theirs = (nnx.to_pure_dict(nnx.state(load_pretrained(p))) for p in (path, tmp_path / "renamed"))
    flat = lambda tree: {k: np.asarray(v) for k, v in nnx.traversals.flatten_mapping(tree).items()}  # noqa: E731
    a, b = flat(ours), flat(theirs)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_export_is_bit_identical_and_reloads_in_transformers(tmp_path, hf_tied):
    import transformers
    hf, path = hf_tied
    save_pretrained(load_pretrained(path), tmp_path / "export")
    with safe_open(path / "model.safetensors", "np") as src, \
            safe_open(tmp_path / "export" / "model.safetensors", "np") as out:
        assert set(src.keys()) == set(out.keys())
        for key in src.keys():
            a, b = src.get_tensor(key), out.get_tensor(key)
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key
    assert json.loads((tmp_path / "export" / "config.json").read_text()) == json.loads(
        (path / "config.json").read_text())
    reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    ids, mask, token_type_ids, pixels = _batch()
    np.testing.assert_array_equal(_hf_logits(reloaded, ids, mask, token_type_ids, pixels),
                                  _hf_logits(hf, ids, mask, token_type_ids, pixels))


@nnx.jit
def _prefill(model, ids, positions, segment_ids, pixels, token_type_ids, cache):
    logits, cache = model(ids, positions=positions, segment_ids=segment_ids, pixel_values=pixels,
                          token_type_ids=token_type_ids, cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1), cache


@nnx.jit
def _decode(model, token, position, cache):
    logits, cache = model(token[:, None], positions=position[:, None], segment_ids=jnp.ones_like(token[:, None]),
                          cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1), cache


def test_greedy_generation_with_kv_cache_matches_hf_generate(hf_tied):
    hf, path = hf_tied
    model = load_pretrained(path)
    ids, mask, token_type_ids, pixels = _batch(pad_to=19)
    # Left padding for generation, as HF generate expects.
    lengths = mask.sum(1)
    ids, mask, token_type_ids = (np.stack([np.roll(a[r], a.shape[1] - lengths[r]) for r in range(2)])
                                 for a in (ids, mask, token_type_ids))
    new_tokens = 8
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), token_type_ids=torch.tensor(token_type_ids),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False).numpy()[:, 19:]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = model.init_cache(2, 19 + new_tokens)
    token, cache = _prefill(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask), jnp.asarray(pixels),
                            jnp.asarray(token_type_ids), cache)
    out, position = [token], jnp.asarray(positions[:, -1] + 1)
    for _ in range(new_tokens - 1):
        token, cache = _decode(model, token, position, cache)
        out.append(token)
        position = position + 1
    np.testing.assert_array_equal(np.stack(out, axis=1), ref)


def test_training_api_and_hf_config_defaults():
    """hidden_states/logits/output_head as the training step uses them; a published-style config.json (text_config
    listing only a few fields) gets HF's defaults."""
    _, cfg = family_config({"model_type": "gemma3", "text_config": {"hidden_size": 2560, "num_hidden_layers": 34,
                                                                     "intermediate_size": 10240, "sliding_window": 1024,
                                                                     "rope_scaling": {"rope_type": "linear",
                                                                                      "factor": 8.0}},
                            "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                                              "model_type": "siglip_vision_model", "num_attention_heads": 16,
                                              "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}})
    assert (cfg.vocab_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (262_208, 8, 4, 256)
    assert cfg.tie_word_embeddings and cfg.vision.patches_per_side == 64 and cfg.tokens_per_side == 16
    assert cfg.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert cfg.rope.factor == 8.0 and cfg.local_rope.theta == 10_000.0


@pytest.mark.parametrize("bad, message", [
    (dict(mm_tokens_per_image=5), r"mm_tokens_per_image 5 is not a square number"),
    (dict(mm_tokens_per_image=9), r"mm_tokens_per_image 9 \(3 per side\) does not evenly pool the 4x4 patches"),
    (dict(vision_config=dict(VISION, vision_use_head=True)), r"vision_config: vision_use_head true is not supported"),
    (dict(vision_config=dict(VISION, model_type="clip_vision_model")),
     r"vision_config: model_type 'clip_vision_model' is not supported"),
    (dict(vision_config=dict(VISION, image_size=30)), r"image_size 30 is not a multiple of patch_size 8"),
    (dict(text_config=dict(TEXT, hidden_activation="gelu_10")), r"hidden_activation 'gelu_10' is not supported"),
])
def test_unsupported_config_values_are_clear_errors(bad, message):
    hf = {"model_type": "gemma3", "text_config": TEXT, "vision_config": VISION, "mm_tokens_per_image": 4, **bad}
    with pytest.raises(ValueError, match=message):
        family_config(hf)


def test_hidden_states_takes_attention_inputs_like_causal_lm(hf_tied):
    from automodel_jax.models.attention import AttentionInputs
    hf, path = hf_tied
    model = load_pretrained(path)
    ids, mask, token_type_ids, pixels = _batch()
    inputs = AttentionInputs.build(jnp.asarray(ids), jnp.asarray(mask))
    h = nnx.jit(lambda m, i, x, p, t: m.hidden_states(i, x, pixel_values=p, token_type_ids=t))(
        model, jnp.asarray(ids), inputs, jnp.asarray(pixels), jnp.asarray(token_type_ids))
    logits = model.logits(h)
    assert model.logit_softcap is None  # transformers' Gemma3ForConditionalGeneration ignores final_logit_softcapping
    direct = jnp.dot(*model.output_head(h))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(direct), atol=1e-5)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], _hf_logits(hf, ids, mask, token_type_ids, pixels)[real],
                               atol=1e-4, rtol=0)


def _row_batch(image_token=IMAGE):
    """`_batch`'s two rows in the VLM collator's per-row layout: max_images 3 (row 0 has 2 images, row 1 one and
    right padding), seq_len 20; labels are the next token on text, IGNORE elsewhere. Also returns _batch()."""
    from automodel_jax.data.vlm_batches import VLMCollator
    flat = _batch(image_token)
    ids, mask, token_type_ids, pixels = flat
    counts, samples = [2, 1], []
    for r, first in enumerate([0, 2]):
        n = int(mask[r].sum())
        labels = np.where(token_type_ids[r, :n] == 1, -100, np.roll(ids[r, :n], -1))
        samples.append(dict(input_ids=ids[r, :n], labels=labels, token_type_ids=token_type_ids[r, :n],
                            pixel_values=pixels[first:first + counts[r]]))
    collate = VLMCollator(model_type="gemma3", seq_len=20, max_images=3, pad_id=0, pixel_shape=(3, 32, 32))
    return collate(samples), flat


def _row_logits_fn():
    from automodel_jax.models.attention import AttentionInputs

    def logits(model, batch):
        inputs = AttentionInputs(batch["segment_ids"], batch["positions"])
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "segment_ids", "positions")}
        return model.logits(model.hidden_states(batch["input_ids"], inputs, **extra))
    return logits


def test_per_row_batch_matches_flat_call_and_trains(hf_tied):
    """host_batch + hidden_states on the collator's per-row layout (pixel_values [B, max_images, ...], padded
    images) inside jit give the flat public call's logits on real tokens, and gradients are finite."""
    model = load_pretrained(hf_tied[1])
    collated, (ids, mask, token_type_ids, pixels) = _row_batch()
    batch = Gemma3ForConditionalGeneration.host_batch(model.config, collated)
    assert set(batch) == {"input_ids", "labels", "segment_ids", "positions", "token_type_ids", "pixel_values",
                          "image_mask"}
    assert batch["pixel_values"].shape == (2, 3, 3, 32, 32) and batch["image_mask"].tolist() == [[1, 1, 0], [1, 0, 0]]
    logits_fn = _row_logits_fn()
    out = np.asarray(nnx.jit(logits_fn)(model, batch))
    real = mask.astype(bool)
    flat = np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                              jnp.asarray(token_type_ids)))
    np.testing.assert_allclose(out[:, :ids.shape[1]][real], flat[real], atol=1e-5, rtol=0)
    # image_mask picks the images: row 0's second image moved to slot 2 (garbage in slot 1) gives the same logits.
    moved = dict(batch, pixel_values=batch["pixel_values"].copy(), image_mask=batch["image_mask"].copy())
    moved["pixel_values"][0, 2], moved["pixel_values"][0, 1] = batch["pixel_values"][0, 1], 7.0
    moved["image_mask"][0] = [True, False, True]
    np.testing.assert_allclose(np.asarray(nnx.jit(logits_fn)(model, moved)), out, atol=1e-6, rtol=0)

    def loss(m, batch):
        logp = jax.nn.log_softmax(logits_fn(m, batch), axis=-1)
        labels = batch["labels"]
        nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(labels >= 0, nll, 0)) / jnp.sum(labels >= 0)

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model, batch)
    leaves = jax.tree.leaves(nnx.to_pure_dict(grads))
    assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert float(jnp.abs(grads.vision_tower.embeddings.patch_embedding.kernel[...]).max()) > 0


def test_host_batch_rejects_mismatched_images(hf_tied):
    model = load_pretrained(hf_tied[1])
    collated, _ = _row_batch()
    collated["image_mask"][1, 1] = True
    with pytest.raises(ValueError, match=r"batch row 1: 4 image tokens \(id 290\) but 2 real images x 4 tokens"):
        Gemma3ForConditionalGeneration.host_batch(model.config, collated)
    with pytest.raises(ValueError, match=r"lacks \['image_mask'\]"):
        Gemma3ForConditionalGeneration.host_batch(model.config, {k: v for k, v in collated.items()
                                                                 if k != "image_mask"})


def test_per_row_batch_sharded_over_eight_devices_matches_one_device():
    """8 rows of 0-2 images, batch axis over data x fsdp = 8 simulated devices (vlm_batch_program.py)."""
    from vlm_batch_program import run  # tests/models is on sys.path (pytest prepend import mode)
    record = run("gemma3")
    assert record["devices"] == 8 and record["finite"] and record["spec"] == "(('data', 'fsdp'),)"
    assert record["max_diff"] < 1e-5


def test_a_tied_config_with_a_different_stored_head_loads_untied_as_transformers_does(tmp_path, caplog):
    import transformers
    _hf_model(tmp_path / "ckpt", tie=False)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    model = load_pretrained(tmp_path / "ckpt")
    assert not model.config.tie_word_embeddings
    assert any("lm_head.weight" in r.getMessage() and "embed_tokens.weight" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    ids, mask, token_type_ids, pixels = _batch()
    real = mask.astype(bool)
    out = np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                             jnp.asarray(token_type_ids)))
    np.testing.assert_allclose(out[real], _hf_logits(hf, ids, mask, token_type_ids, pixels)[real], atol=1e-4, rtol=0)
