"""LoRA adapters: targeting by glob/regex/exclude, PEFT-like init, frozen base, merge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from automodel_jax import AutoModelForCausalLM
from automodel_jax.peft.lora import adapters, apply_lora, find_targets, merge_lora, merged_kernels
from automodel_jax.peft.lora import split_model

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model():
    return AutoModelForCausalLM.from_config(TINY, seed=0)


@pytest.mark.parametrize("targets, exclude, expected", [
    (("*_proj",), (), [f"model.layers.{i}.{m}.{p}" for i in range(2) for m, p in
                       [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                        ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]]),
    (["q_proj", "v_proj"], (), [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]),
    ("all-linear", ["re:.*mlp.*", "model.layers.1.self_attn.k_proj"],
     ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
      "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
      "model.layers.1.self_attn.o_proj"]),
    (["re:model\\.layers\\.1\\..*_proj"], ["*gate*"], [f"model.layers.1.{m}.{p}" for m, p in
      [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
       ("mlp", "up_proj"), ("mlp", "down_proj")]]),
])
def test_targets(targets, exclude, expected):
    assert sorted(find_targets(_model(), targets, exclude)) == sorted(expected)


def test_all_linear_skips_lm_head_and_bad_targets_are_clear():
    assert not any("lm_head" in t for t in find_targets(_model(), "all-linear"))
    with pytest.raises(ValueError, match=r"matches no Linear layer; layer names are \[.*'q_proj'"):
        find_targets(_model(), ["qkv"])
    with pytest.raises(ValueError, match=r"module pattern 're:\[' is not a valid regular expression"):
        find_targets(_model(), ["re:["])


def test_init_shapes_scale_and_zero_output_change():
    model = _model()
    ids = jnp.arange(12).reshape(2, 6)
    before = model(ids)
    apply_lora(model, r=4, alpha=8.0, target_modules=("*_proj",))
    ad = adapters(model)
    a, b = ad["model.layers.0.mlp.gate_proj"]
    assert a.shape == (32, 4) and b.shape == (4, 48) and not b.any()
    bound = 1 / np.sqrt(32)
    assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.5 * bound  # kaiming-uniform(a=sqrt(5))
    assert model.model.layers[0].mlp.gate_proj.lora_scale == 2.0
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(before))  # B = 0: same function


def test_gradients_only_for_adapters_and_merge_matches():
    model = _model()
    apply_lora(model, r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])
    graphdef, trainable, frozen = split_model(model, lora=True)
    leaves = jax.tree_util.tree_flatten_with_path(trainable)[0]
    assert {str(p[-1].key) for p, _ in leaves} == {"lora_a", "lora_b"} and len(leaves) == 8
    assert all("lora" not in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(frozen)[0])
    # make B non-zero, then merged weights reproduce the adapted model
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)
    adapted = nnx.merge(graphdef, trainable, frozen)
    ids = jnp.arange(12).reshape(2, 6) % 64
    want = adapted(ids)
    kernels = merged_kernels(adapted)
    assert set(kernels) == {("model", "layers", i, "self_attn", p, "kernel") for i in range(2)
                            for p in ("q_proj", "v_proj")}
    merge_lora(adapted)
    assert not adapters(adapted)
    np.testing.assert_allclose(np.asarray(adapted(ids)), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("kw, message", [(dict(r=0), "peft.r must be a positive integer"),
                                         (dict(r=4, dropout=1.0), r"peft.dropout must be in \[0, 1\)")])
def test_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        apply_lora(_model(), alpha=8.0, **kw)
