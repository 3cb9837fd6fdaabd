"""PEFT adapters against the real consumers and producer: peft.PeftModel reads ours with equal logits, our merged export
equals PEFT's merge_and_unload and loads in transformers, and adapters PEFT writes load into our model."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from automodel_jax import AutoModelForCausalLM
from automodel_jax.checkpoint.peft_io import load_peft_adapter, save_peft_adapter
from automodel_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile
from automodel_jax.checkpoint.export import export_model
from automodel_jax.models.layers import LoRAParam
from automodel_jax.peft.lora import adapters, apply_lora, linear_modules

IDS = np.random.default_rng(0).integers(0, 101, size=(2, 12))


def our_logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)), np.float32)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.float().numpy()


@pytest.fixture
def adapted(hf_llama_factory):
    """(our model with LoRA r=4 on every projection, random non-zero A and B; HF checkpoint dir of its base)."""
    _, base_dir = hf_llama_factory()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    apply_lora(model, r=4, alpha=8.0, target_modules="*_proj")
    key = jax.random.key(1)
    for i, layer in enumerate(layer for layer in linear_modules(model).values() if layer.lora_a is not None):
        a, b = jax.random.split(jax.random.fold_in(key, i))
        layer.lora_a = LoRAParam(0.2 * jax.random.normal(a, layer.lora_a[...].shape))
        layer.lora_b = LoRAParam(0.2 * jax.random.normal(b, layer.lora_b[...].shape))
    return model, base_dir


def hf_base(base_dir):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def test_peft_reads_our_adapter_with_equal_logits(adapted, tmp_path):
    from peft import PeftModel
    model, base_dir = adapted
    save_peft_adapter(model, tmp_path / "adapter", str(base_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["lora_alpha"] == 8.0 and config["bias"] == "none" and config["use_dora"] is False
    assert config["target_modules"] == sorted(adapters(model)) and "model.layers.1.mlp.down_proj" in config[
        "target_modules"] and config["base_model_name_or_path"] == str(base_dir)
    weights = SafetensorsFile(tmp_path / "adapter" / "adapter_model.safetensors")
    a_shape = weights.entries["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][1]
    b_shape = weights.entries["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"][1]
    assert (a_shape, b_shape) == ((4, 80), (48, 4))
    peft_model = PeftModel.from_pretrained(hf_base(base_dir), tmp_path / "adapter").eval()
    ours = our_logits(model)
    assert np.abs(ours - our_logits(AutoModelForCausalLM.from_pretrained(base_dir))).max() > 1e-2
    np.testing.assert_allclose(torch_logits(peft_model), ours, atol=1e-4, rtol=1e-4)


def test_merged_export_equals_peft_merge_and_loads_in_transformers(adapted, tmp_path):
    import transformers
    from peft import PeftModel
    model, base_dir = adapted
    save_peft_adapter(model, tmp_path / "adapter", str(base_dir))
    export_model(model, tmp_path / "merged", base_model_name_or_path=str(base_dir), merge_lora=True)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "merged").iterdir()}
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(merged), our_logits(model), atol=1e-4, rtol=1e-4)
    reference = PeftModel.from_pretrained(hf_base(base_dir), tmp_path / "adapter").merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        np.testing.assert_allclose(ours[name].numpy(), tensor.numpy(), atol=1e-6, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapters_peft_writes_load_with_equal_logits(hf_llama_factory, tmp_path, use_rslora):
    from peft import LoraConfig, get_peft_model
    _, base_dir = hf_llama_factory()
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1,
                        init_lora_weights=False, use_rslora=use_rslora, task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_base(base_dir), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    loaded = load_peft_adapter(model, tmp_path / "peft")
    assert len(loaded) == 6 and all(p.endswith(("q_proj", "v_proj", "down_proj")) for p in loaded)
    assert linear_modules(model)["model.layers.0.self_attn.q_proj"].lora_dropout == 0.1
    np.testing.assert_allclose(our_logits(model), torch_logits(peft_model), atol=1e-4, rtol=1e-4)


def test_our_adapter_round_trips_exactly(adapted, tmp_path):
    model, base_dir = adapted
    save_peft_adapter(model, tmp_path / "adapter", str(base_dir))
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32")
    load_peft_adapter(fresh, tmp_path / "adapter")
    want, got = adapters(model), adapters(fresh)
    assert want.keys() == got.keys()
    for name in want:
        for x, y in zip(want[name], got[name]):
            assert np.array_equal(np.asarray(x), np.asarray(y)), name


def test_bad_adapters_and_directories_are_refused_clearly(adapted, tmp_path):
    model, base_dir = adapted
    out = tmp_path / "adapter"
    save_peft_adapter(model, out, str(base_dir))
    with pytest.raises(FileExistsError, match="is not empty; choose another directory or pass overwrite=True"):
        save_peft_adapter(model, out, str(base_dir))
    save_peft_adapter(model, out, str(base_dir), overwrite=True)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_peft_adapter(model, out)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        save_peft_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "none", str(base_dir))
    with pytest.raises(FileNotFoundError, match="missing adapter_config.json"):
        load_peft_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path)
    config = json.loads((out / "adapter_config.json").read_text())
    for change, message in ((dict(use_dora=True), "use_dora=True is not supported"),
                            (dict(r=8), r"has lora_A \[4, 80\] and lora_B \[48, 4\]; r=8"),
                            (dict(peft_type="IA3"), "peft_type 'IA3' is not supported")):
        (out / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            load_peft_adapter(AutoModelForCausalLM.from_pretrained(base_dir), out)
    (out / "adapter_config.json").write_text(json.dumps(config))
    other = AutoModelForCausalLM.from_config(dict(model_type="llama", vocab_size=101, hidden_size=48,
                                                  intermediate_size=80, num_hidden_layers=1, num_attention_heads=4,
                                                  num_key_value_heads=2))
    with pytest.raises(CheckpointError, match="module model.layers.1.mlp.down_proj is not a Linear layer"):
        load_peft_adapter(other, out)
