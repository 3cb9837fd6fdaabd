"""model.scan_layers: the decoder layers as one stacked module run by a scan compute what the unrolled layers compute
(logits, gradients under every remat policy, LoRA steps, generation), load and export HF checkpoints bit-identically,
keep PEFT adapter files identical, and refuse what a scan cannot honour with one line naming the fix."""
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
from automodel_jax.checkpoint.hf import save_pretrained
from automodel_jax.models.base import build_model
from automodel_jax.models.params import flatten, layer_paths, pure_dict, stacked_at, unflatten
from automodel_jax.parallel.sharding import param_axes
from reference import TINY

LLAMA = dict(model_type="llama", **{**TINY, "num_hidden_layers": 3})


def stacked_state(unrolled, scanned) -> dict:
    """The unrolled model's variables (parameters, adapters, FP8 state) in the scanned model's layout: per-layer
    arrays stacked on a leading layer axis (copies: a train step may donate either model's)."""
    flat = flatten(pure_dict(unrolled))
    out = {}
    for path, x in flatten(pure_dict(scanned)).items():
        out[path] = jnp.stack([flat[p] for p in layer_paths(path, x.shape[0])]) if stacked_at(path) is not None \
            else jnp.copy(flat[path])
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


def unstacked(flat: dict) -> dict:
    """{per-layer path: array} of a flat {path: array} that may hold stacked paths (each slice under its layer's
    path), to compare a scanned model's trees with an unrolled one's."""
    out = {}
    for path, x in flat.items():
        for i, p in enumerate(layer_paths(path, np.shape(x)[0] if stacked_at(path) is not None else 1)):
            out[p] = x[i] if stacked_at(path) is not None else x
    return out


def train_steps(model, lora: bool, mesh_cfg=None, steps: int = 2):
    """`steps` steps of the recipe's own jitted train step (AdamW, naive loss, 2 micro-batches); (losses, final
    trainable parameters by per-layer path, final FP8 amax histories by per-layer path)."""
    from automodel_jax.models.layers import amax_histories
    from automodel_jax.parallel.sharding import mesh_from_config, tree_shardings
    from automodel_jax.peft.lora import split_model
    from automodel_jax.training.optim import build_optimizer, optim_defaults
    from automodel_jax.training.step import compile_steps, init_state, make_eval_step, make_train_step
    mesh, rules = mesh_from_config(mesh_cfg or {}, devices=None if mesh_cfg else jax.devices()[:1])
    cfg = optim_defaults()
    cfg.update(name="adamw", learning_rate=1e-2, weight_decay=0.01)
    opt, schedule = build_optimizer(cfg, steps)
    graphdef, trainable, frozen = split_model(model, lora)
    state, shardings = init_state(trainable, opt, 0, tree_shardings(model, trainable, mesh, rules),
                                  amax_histories(model))
    frozen_shardings = tree_shardings(model, frozen, mesh, rules)
    frozen = jax.device_put(frozen, frozen_shardings)
    kw = dict(loss_impl="naive", chunk_size=None, max_segments=1)
    train_step, _, batch_3d, _ = compile_steps(
        make_train_step(graphdef, opt, schedule, grad_shardings=shardings["params"], **kw),
        make_eval_step(graphdef, **kw), shardings, frozen_shardings, mesh, rules)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        lengths = rng.integers(4, 13, size=(2, 8))
        real = np.arange(12)[None, None, :] < lengths[..., None]
        ids = rng.integers(0, TINY["vocab_size"], size=(2, 8, 12))
        batch = dict(input_ids=np.where(real, ids, 0).astype(np.int32),
                     labels=np.where(real, np.roll(ids, -1, axis=-1), -100).astype(np.int32),
                     segment_ids=real.astype(np.int32), positions=np.where(real, np.arange(12), 0).astype(np.int32))
        state, metrics = train_step(state, frozen, jax.device_put(batch, batch_3d))
        losses.append(float(metrics["loss"]))
    return (losses, unstacked({p: np.asarray(x) for p, x in flatten(state["params"]).items()}),
            unstacked({p: np.asarray(x) for p, x in flatten(state.get("fp8", {})).items()}), state["params"])


def lora_pair(**lora):
    """(unrolled, scanned) with the same base weights and adapters applied by each model's own apply_lora."""
    from automodel_jax.peft.lora import apply_lora
    unrolled = build_model(LLAMA)
    scanned = scanned_copy(unrolled)
    for model in (unrolled, scanned):
        apply_lora(model, r=4, alpha=8.0, target_modules=("*_proj",), seed=1, **lora)
    return unrolled, scanned


def test_lora_starts_equal_and_trains_equal():
    from automodel_jax.peft.lora import adapters, lora_settings
    unrolled, scanned = lora_pair()
    assert scanned.model.layers.self_attn.q_proj.lora_a[...].shape == (3, 48, 4)
    assert scanned.model.layers.self_attn.q_proj.lora_b[...].shape == (3, 4, 48)
    a_u, a_s = adapters(unrolled), adapters(scanned)
    assert sorted(a_s) == sorted(a_u) and "model.layers.2.mlp.down_proj" in a_s
    for name in a_u:  # apply_lora gives each per-layer module the same init, scanned or not
        np.testing.assert_array_equal(a_s[name][0], a_u[name][0])
    assert lora_settings(scanned) == lora_settings(unrolled)
    losses_u, params_u, _, _ = train_steps(unrolled, lora=True)
    losses_s, params_s, _, _ = train_steps(scanned, lora=True)
    np.testing.assert_allclose(losses_s, losses_u, rtol=1e-6)
    assert sorted(params_s) == sorted(params_u)
    for path, x in params_u.items():
        np.testing.assert_allclose(params_s[path], x, atol=1e-6, rtol=1e-5, err_msg=str(path))


def test_full_sft_trains_equal():
    unrolled = build_model(LLAMA)
    scanned = scanned_copy(unrolled)
    losses_u, params_u, _, _ = train_steps(unrolled, lora=False)
    losses_s, params_s, _, _ = train_steps(scanned, lora=False)
    np.testing.assert_allclose(losses_s, losses_u, rtol=1e-6)
    for path, x in params_u.items():
        np.testing.assert_allclose(params_s[path], x, atol=1e-6, rtol=1e-5, err_msg=str(path))


def forward_scan_residuals(model, ids) -> list:
    """The avals the forward layer scan saves for the backward pass (its stacked outputs [L, ...]) in the gradient of
    a loss with respect to the model's LoRA adapters."""
    from jax._src.core import jaxprs_in_params
    from automodel_jax.models.layers import LoRAParam
    graphdef, adapters_, rest = nnx.split(model, LoRAParam, ...)
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: nnx.merge(graphdef, a, rest)(ids).astype(jnp.float32).mean()))(
        adapters_).jaxpr

    def scans(j):
        for e in j.eqns:
            yield from [e] if e.primitive.name == "scan" else []
            for sub in jaxprs_in_params(e.params):
                yield from scans(sub)
    forward = next(scans(jaxpr))  # the first scan is the forward pass's
    return [v.aval for v in forward.outvars[forward.params["num_carry"]:]]


def test_scanned_layers_save_no_cheap_elementwise_residuals():
    """remat none in a scan (`base.scan_save_policy`): the float32 upcasts of RMSNorm and SiLU's intermediates are
    recomputed, not stacked over the layers; the MLP keeps only gate_proj's and up_proj's outputs."""
    from automodel_jax.peft.lora import apply_lora
    cfg = {**LLAMA, "intermediate_size": 80, "hidden_size": 48}
    model = build_model(cfg, scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    apply_lora(model, r=4, alpha=8.0)
    ids = jnp.zeros((2, 16), jnp.int32)
    residuals = forward_scan_residuals(model, ids)
    layers, hidden, inter = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    assert not [a for a in residuals if a.dtype == jnp.float32 and a.shape == (layers, 2, 16, hidden)]
    assert [a.dtype for a in residuals if a.shape == (layers, 2, 16, inter)] == [jnp.bfloat16] * 2


def test_scanned_step_needs_no_more_temporary_memory_than_unrolled(tmp_path):
    """XLA's own accounting (`memory_analysis().temp_size_in_bytes`) of the recipe's LoRA train step, compiled on
    abstract inputs: with remat none, scanned layers need no more temporaries than unrolled ones (before
    `scan_save_policy`: 1.12x at hidden 512, 8 layers, seq 512)."""
    from automodel_jax.recipes.llm.finetune import default_config
    from automodel_jax.training import plan
    hf = dict(model_type="llama", **{**TINY, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 4,
                                     "vocab_size": 256, "max_position_embeddings": 256})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    temps = {}
    for scan in (False, True):
        cfg = default_config()
        cfg.run_dir = str(tmp_path / "run")
        cfg.model.update(path=str(tmp_path), dtype="bfloat16", param_dtype="bfloat16", remat="none",
                         scan_layers=scan)
        cfg.peft.update(method="lora", r=8, alpha=32.0, target_modules=("*_proj",))
        cfg.data.seq_len = 128
        cfg.train.update(global_batch_size=4, micro_batch_size=4)
        cfg.mesh.update(data=1, fsdp=-1)
        planner = plan.Planner(cfg, str(tmp_path), memory=None, devices=jax.devices()[:1])
        train, args, _ = planner.lower_args(planner.own(), planner.layers)
        temps[scan] = train.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temps[True] <= temps[False], temps


def test_peft_adapter_files_equal_unrolled_and_load_back(tmp_path):
    from automodel_jax.checkpoint.peft_io import load_peft_adapter, save_peft_adapter
    from automodel_jax.peft.lora import merged_kernels
    unrolled, scanned = lora_pair()
    rng = np.random.default_rng(0)  # trained-looking adapters: lora_b non-zero
    flat = flatten(pure_dict(unrolled))
    for p in [p for p in flat if p[-1] == "lora_b"]:
        flat[p] = jnp.asarray(rng.normal(size=flat[p].shape).astype(np.float32))
    nnx.update(unrolled, unflatten(flat))
    nnx.update(scanned, stacked_state(unrolled, scanned))
    save_peft_adapter(unrolled, tmp_path / "unrolled", "base")
    save_peft_adapter(scanned, tmp_path / "scanned", "base")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "scanned" / name).read_bytes() == (tmp_path / "unrolled" / name).read_bytes(), name
    # Loaded back into a fresh scanned model with the same base: the same logits and merged kernels.
    fresh = scanned_copy(_base_of(unrolled))
    load_peft_adapter(fresh, tmp_path / "unrolled")
    ids, mask = batch()
    np.testing.assert_allclose(np.asarray(fresh(ids, mask)), np.asarray(unrolled(ids, mask)), atol=2e-6, rtol=0)
    merged_u = unstacked({p: np.asarray(x) for p, x in merged_kernels(unrolled).items()})
    merged_s = unstacked({p: np.asarray(x) for p, x in merged_kernels(fresh).items()})
    assert sorted(merged_s) == sorted(merged_u)
    for path, x in merged_u.items():
        np.testing.assert_allclose(merged_s[path], x, atol=1e-6, rtol=1e-6)


def _base_of(model):
    """A fresh unrolled model with `model`'s base weights (no adapters)."""
    base = build_model(LLAMA)
    nnx.update(base, unflatten({p: x for p, x in flatten(pure_dict(model, nnx.Param)).items()
                                if p[-1] not in ("lora_a", "lora_b")}))
    return base


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_lora_trains_equal(recipe):
    from automodel_jax.models.layers import apply_fp8
    unrolled, scanned = lora_pair()
    history = 4 if recipe == "delayed" else None
    chosen = [apply_fp8(m, ("o_proj",), amax_history_len=history) for m in (unrolled, scanned)]
    assert "model.layers.self_attn.q_proj" in chosen[1] and "model.layers.self_attn.o_proj" not in chosen[1]
    if history:
        assert scanned.model.layers.self_attn.q_proj.amax_history[...].shape == (3, 3, 4)
    ids, mask = batch()
    np.testing.assert_allclose(np.asarray(scanned(ids, mask)), np.asarray(unrolled(ids, mask)), atol=1e-5, rtol=0)
    losses_u, params_u, fp8_u, _ = train_steps(unrolled, lora=True)
    losses_s, params_s, fp8_s, _ = train_steps(scanned, lora=True)
    np.testing.assert_allclose(losses_s, losses_u, rtol=1e-5)
    for path, x in params_u.items():
        np.testing.assert_allclose(params_s[path], x, atol=1e-5, rtol=1e-4, err_msg=str(path))
    assert sorted(fp8_s) == sorted(fp8_u) and (len(fp8_u) > 0) == (recipe == "delayed")
    for path, x in fp8_u.items():  # each layer's amax history rolled with its own amaxes
        np.testing.assert_allclose(fp8_s[path], x, rtol=1e-5, err_msg=str(path))


def test_cached_generation_matches_unrolled():
    from automodel_jax.generation import generate
    unrolled = build_model(LLAMA)
    scanned = scanned_copy(unrolled)
    cache = scanned.init_cache(2, 16)
    assert cache.k.shape == (3, 2, 16, 2, 12) and cache.stacked
    ids, mask = batch()
    ids, mask = np.asarray(ids), np.asarray(mask)
    outs = []
    for model in (unrolled, scanned):  # prefill 6 tokens, then 5 decode steps, through the jitted cached call
        graphdef, state = nnx.split(model)
        step = jax.jit(lambda state, ids, mask, cache: nnx.merge(graphdef, state)(ids, mask, cache=cache))
        cache = model.init_cache(2, 16)
        logits, cache = step(state, ids[:, :6], mask[:, :6], cache)
        got = [logits]
        for t in range(6, 11):
            logits, cache = step(state, ids[:, t:t + 1], mask[:, t:t + 1], cache)
            got.append(logits)
        outs.append((np.concatenate([np.asarray(g) for g in got], axis=1), cache))
    np.testing.assert_allclose(outs[1][0], outs[0][0], atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(outs[1][1].k), np.stack(outs[0][1].k), atol=2e-6, rtol=0)
    tokens = [generate(m, None, [[5, 7, 9], [3, 1, 4, 1, 5]], max_new_tokens=6, eos_token_id=None, pad_token_id=0)
              for m in (unrolled, scanned)]
    assert tokens[0] == tokens[1]


def test_non_uniform_layers_are_refused():
    gemma2 = dict(model_type="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
    build_model(gemma2)  # unrolled: fine
    with pytest.raises(ValueError, match=r"^model.scan_layers=true needs identical decoder layers, but this model "
                                         r"mixes full_attention and sliding_attention layers .*set "
                                         r"model.scan_layers=false$"):
        build_model(gemma2, scan_layers=True)


def test_patterns_naming_a_layer_are_refused():
    from automodel_jax.models.layers import apply_fp8
    from automodel_jax.peft.lora import apply_lora
    scanned = build_model(LLAMA, scan_layers=True)
    with pytest.raises(ValueError, match=r"^peft.target_modules pattern 're:model.layers.0..\*' selects only some "
                                         r"layers of the scanned module model.layers.mlp.down_proj, .* set "
                                         r"model.scan_layers=false, or use a pattern without a layer index$"):
        apply_lora(scanned, r=2, alpha=4.0, target_modules=("re:model.layers.0..*",))
    with pytest.raises(ValueError, match=r"^peft.exclude_modules pattern 'model.layers.1.self_attn.q_proj' selects"):
        apply_lora(scanned, r=2, alpha=4.0, exclude_modules=("model.layers.1.self_attn.q_proj",))
    with pytest.raises(ValueError, match=r"^model.fp8.filter_modules pattern 'layers.2.mlp.up_proj' selects only"):
        apply_fp8(scanned, ("layers.2.mlp.up_proj",))
    # Patterns that take every layer are fine, index or not.
    assert apply_lora(scanned, r=2, alpha=4.0, target_modules=("re:model\\.layers\\.[0-2]\\.self_attn\\.q_proj",)) \
        == ["model.layers.self_attn.q_proj"]


@pytest.mark.slow
def test_scanned_training_on_meshes_matches_unrolled(tmp_path):
    """fsdp=8 and fsdp=2 x tensor=4 (8 simulated CPU devices, in a subprocess): scanned LoRA and full SFT steps equal
    the unrolled ones, stacked parameters keep the rule table's spec behind an unsharded layer axis, and a sharded HF
    checkpoint streamed onto the mesh exports the unrolled model's files byte for byte."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    program = Path(__file__).with_name("scan_mesh_program.py")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, str(program), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["devices"] == 8
    for method in ("lora", "sft"):
        for mesh in ("one", "fsdp8", "fsdp2_tensor4"):
            run = record[f"{method}/{mesh}"]
            np.testing.assert_allclose(run["losses_scanned"], run["losses_unrolled"], rtol=1e-5)
            np.testing.assert_allclose(run["losses_scanned"], record[f"{method}/one"]["losses_unrolled"], rtol=1e-5)
            assert run["max_param_diff"] < 1e-4, (method, mesh)  # AdamW amplifies rounding on tiny gradients
    specs = record["sft/fsdp2_tensor4"]["specs"]
    assert specs["model.layers.self_attn.q_proj.kernel"] == "(None, 'fsdp', 'tensor')"
    assert specs["model.layers.self_attn.o_proj.kernel"] == "(None, 'tensor', 'fsdp')"
    assert record["lora/fsdp8"]["specs"]["model.layers.self_attn.q_proj.lora_a"] == "(None, 'fsdp')"
    loaded = record["load_export"]  # streamed onto fsdp=2 x tensor=4, exported from there
    assert loaded["identical"] and "model.safetensors.index.json" in loaded["files"]
    assert loaded["q_proj_spec"] == "(None, 'fsdp', 'tensor')"


def test_orbax_checkpoint_of_scanned_lora_round_trips(tmp_path):
    """A scanned run's checkpoint records its layout: loading it (export) rebuilds scanned layers, and restoring it
    into an unrolled config is one line naming model.scan_layers."""
    from automodel_jax.checkpoint.orbax_io import (check_compatible, load_checkpoint_model, model_meta,
                                                   save_params_checkpoint)
    from automodel_jax.checkpoint.safetensors_io import CheckpointError
    from automodel_jax.peft.lora import adapters, apply_lora
    _, path = _hf_checkpoint(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path, scan_layers=True)
    apply_lora(model, r=4, alpha=8.0, target_modules=("q_proj", "v_proj"), seed=3)
    save_params_checkpoint(model, tmp_path / "params", model_path=str(path))
    loaded, meta = load_checkpoint_model(tmp_path / "params")
    assert meta["scan_layers"] is True and loaded.config.scan_layers
    for name, (a, b) in adapters(model).items():
        np.testing.assert_array_equal(adapters(loaded)[name][0], a)
    unrolled = AutoModelForCausalLM.from_pretrained(path)
    apply_lora(unrolled, r=4, alpha=8.0, target_modules=("q_proj", "v_proj"), seed=3)
    assert "scan_layers" not in model_meta(unrolled, str(path))
    with pytest.raises(CheckpointError, match=r"was trained with model.scan_layers=true but the config says "
                                              r"model.scan_layers=false .*; set model.scan_layers=true or use a "
                                              r"fresh run_dir$"):
        check_compatible(meta, model_meta(unrolled, str(path)), "ckpt")


@pytest.mark.slow
def test_recipe_lora_run_with_scanned_layers_matches_unrolled(assets, tmp_path, monkeypatch):
    """The LLM recipe end to end (plan check, streaming load, training, checkpoint, PEFT export) on stories260K with
    model.scan_layers=true gives the unrolled run's losses and adapter; a family with mixed layers is refused first."""
    from automodel_jax.config import parse_config
    from automodel_jax.recipes.llm import finetune
    from reference import DATA
    from test_finetune import stories_argv
    monkeypatch.setenv("AUTOMODEL_JAX_CACHE", str(tmp_path / "cache"))
    rows = (DATA / "hellaswag" / "validation.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train.write_text("".join(rows[:64]), encoding="utf-8")
    validation.write_text("".join(rows[64:80]), encoding="utf-8")
    results = {}
    for scan in (False, True):
        run_dir = tmp_path / f"run_{scan}"
        results[scan] = finetune.run(parse_config(stories_argv(run_dir, train, validation,
                                                               f"--config.model.scan_layers={str(scan).lower()}")))
    assert results[True]["model"].config.scan_layers and not results[False]["model"].config.scan_layers
    np.testing.assert_allclose(results[True]["val_loss_after"], results[False]["val_loss_after"], rtol=1e-5)
    exported = [load_file(tmp_path / f"run_{scan}" / "export" / "adapter_model.safetensors") for scan in (False, True)]
    assert sorted(exported[1]) == sorted(exported[0])
    for name, x in exported[0].items():
        np.testing.assert_allclose(exported[1][name], x, atol=1e-5, rtol=1e-4, err_msg=name)
    configs = [json.loads((tmp_path / f"run_{scan}" / "export" / "adapter_config.json").read_text())
               for scan in (False, True)]
    assert configs[1] == configs[0]


@pytest.mark.parametrize("family", ["gemma2", "qwen2_sliding"])
def test_recipe_refuses_scanning_mixed_layers_before_loading(hf_model_factory, family):
    import ml_collections
    from automodel_jax.recipes.llm.finetune import check_scan_layers
    from reference import FAMILIES
    model_cls, config_cls, overrides = FAMILIES[family]
    _, path = hf_model_factory(model_cls, config_cls, **overrides)
    cfg = ml_collections.ConfigDict(dict(model=dict(scan_layers=False)))
    check_scan_layers(cfg, str(path))  # off: nothing to check
    cfg.model.scan_layers = True
    with pytest.raises(ValueError, match=r"^model.scan_layers=true needs identical decoder layers, .*; set "
                                         r"model.scan_layers=false$"):
        check_scan_layers(cfg, str(path))


def test_uniform_sliding_windows_scan():
    """A window on every layer (Mistral) is uniform: scanned logits equal unrolled ones."""
    mistral = dict(LLAMA, model_type="mistral", sliding_window=3)
    unrolled = build_model(mistral)
    scanned = build_model(mistral, scan_layers=True)
    nnx.update(scanned, stacked_state(unrolled, scanned))
    ids, mask = batch()
    np.testing.assert_allclose(np.asarray(scanned(ids, mask)), np.asarray(unrolled(ids, mask)), atol=2e-6, rtol=0)
