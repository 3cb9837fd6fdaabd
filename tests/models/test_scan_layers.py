"""model.scan_layers: the decoder layers as one stacked module run by a scan compute what the unrolled layers compute
(logits, gradients under every remat policy, LoRA steps, generation), load and export HF checkpoints bit-identically,
keep PEFT adapter files identical, and refuse what a scan cannot honour with one line naming the fix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from automodel_jax import AutoModelForCausalLM
from automodel_jax.checkpoint.hf import save_pretrained
from automodel_jax.models.base import build_model
from automodel_jax.models.params import flatten, layer_paths, pure_dict, stacked_at, unflatten
from automodel_jax.parallel.sharding import param_axes
from reference import TINY

LLAMA = dict(model_type="llama", **{**TINY, "num_hidden_layers": 3})


def stacked_state(unrolled, scanned) -> dict:
    """The unrolled model's variables (parameters, adapters, FP8 state) in the scanned model's layout: per-layer
    arrays stacked on a leading layer axis."""
    flat = flatten(pure_dict(unrolled))
    out = {}
    for path, x in flatten(pure_dict(scanned)).items():
        out[path] = jnp.stack([flat[p] for p in layer_paths(path, x.shape[0])]) if stacked_at(path) is not None \
            else flat[path]
    return unflatten(out)


def scanned_copy(unrolled, **overrides):
    """A scanned model with the unrolled model's weights (same HF config; `overrides` such as remat)."""
    scanned = build_model(LLAMA, scan_layers=True, **overrides)
    nnx.update(scanned, stacked_state(unrolled, scanned))
    return scanned


def batch():
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, TINY["vocab_size"], (2, 11)))
    mask = jnp.asarray(np.array([[1] * 11, [1] * 7 + [0] * 4]))
    return ids, mask


def loss_and_grads(model, ids, mask):
    """Mean next-token loss and its gradients with respect to every parameter (a nested dict)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(ids, mask)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, pure_dict(grads)


@pytest.mark.parametrize("remat", ["none", "full", "save_dots"])
def test_logits_and_gradients_match_unrolled(remat):
    unrolled = build_model(LLAMA, remat=remat)
    scanned = scanned_copy(unrolled, remat=remat)
    assert scanned.model.layers.self_attn.q_proj.kernel[...].shape == (3, 48, 48)
    ids, mask = batch()
    np.testing.assert_allclose(np.asarray(scanned(ids, mask)), np.asarray(unrolled(ids, mask)), atol=2e-6, rtol=0)
    loss_u, grads_u = loss_and_grads(unrolled, ids, mask)
    loss_s, grads_s = loss_and_grads(scanned, ids, mask)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    expected = flatten(stacked_state(_as_model(unrolled, grads_u), scanned))
    for path, g in flatten(grads_s).items():
        np.testing.assert_allclose(g, expected[path], atol=1e-6, rtol=1e-5, err_msg=str(path))


def _as_model(model, tree):
    """A copy of `model` holding `tree` (gradients shaped like its parameters), for `stacked_state`."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, tree, rest)


def test_stacked_params_have_an_unsharded_leading_layer_axis():
    axes = param_axes(build_model(LLAMA, scan_layers=True))
    assert axes[("model", "layers", "self_attn", "q_proj", "kernel")] == ("layers", "embed", "heads")
    assert axes[("model", "layers", "input_layernorm", "scale")] == ("layers", "norm")
    assert axes[("model", "embed_tokens", "embedding")] == ("vocab", "embed")


def _hf_checkpoint(tmp_path, name="ckpt", torch_dtype=torch.float32, max_shard_size=None, **overrides):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 3, **overrides})
    model = transformers.LlamaForCausalLM(config).eval().to(torch_dtype)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(tmp_path / name, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model, tmp_path / name


def _tensors(directory) -> dict:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("torch_dtype, max_shard_size", [(torch.float32, None), (torch.bfloat16, "20KB")])
def test_load_and_export_is_bit_identical(tmp_path, torch_dtype, max_shard_size):
    hf, path = _hf_checkpoint(tmp_path, torch_dtype=torch_dtype, max_shard_size=max_shard_size)
    model = AutoModelForCausalLM.from_pretrained(path, scan_layers=True)
    assert model.model.layers.mlp.up_proj.kernel[...].shape == (3, 48, 80)
    save_pretrained(model, tmp_path / "out")
    source, exported = _tensors(path), _tensors(tmp_path / "out")
    assert sorted(exported) == sorted(source)
    for name, x in source.items():
        assert exported[name].dtype == x.dtype and exported[name].shape == x.shape, name
        assert exported[name].tobytes() == x.tobytes(), name
    ids, mask = batch()
    with torch.no_grad():
        ref = hf.float()(torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask))).logits.numpy()
    out = np.asarray(model(ids, mask))
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4 if torch_dtype == torch.float32 else 1e-2, rtol=0)


def test_export_equals_the_unrolled_export(tmp_path):
    _, path = _hf_checkpoint(tmp_path)
    unrolled = AutoModelForCausalLM.from_pretrained(path)
    scanned = AutoModelForCausalLM.from_pretrained(path, scan_layers=True)
    save_pretrained(unrolled, tmp_path / "unrolled")
    save_pretrained(scanned, tmp_path / "scanned")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "scanned" / name).read_bytes() == (tmp_path / "unrolled" / name).read_bytes()
