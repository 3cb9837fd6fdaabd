"""VLM export for transformers and PEFT users (tiny random Gemma 3 and Qwen2.5-VL with real offline processors): LoRA
merged into HF safetensors that transformers' own class loads with equal logits; PEFT adapters that
`peft.PeftModel.from_pretrained` loads on the HF model with equal logits, and the reverse; processor files copied with
every export; AutoModelForImageTextToText's model-type checks, from_config and save_pretrained."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from automodel_jax import AutoModelForCausalLM, AutoModelForImageTextToText
from automodel_jax.checkpoint.export import export_model
from automodel_jax.checkpoint.peft_io import PEFT_MODULE_NAMES, load_peft_adapter
from automodel_jax.data.vlm import load_processor
from automodel_jax.generation.vlm import chat_inputs
from automodel_jax.models.layers import LoRAParam
from automodel_jax.peft.lora import adapters, apply_lora, linear_modules
from test_vlm_generate import images, tiny_vlm, torch_inputs

HF_CLASS = {"gemma3": transformers.Gemma3ForConditionalGeneration,
            "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}
PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# Adapted layers: every Linear of both towers, the decoder and the (untied) lm_head, except Gemma 3's projector (a bare
# parameter in HF).
TARGETS = ("*_proj", "fc1", "fc2", "qkv", "proj", r"re:.*merger\.mlp\.[02]", "lm_head")
EXCLUDE = ("mm_input_projection_weight",)


@nnx.jit
def _forward(model, ids, mask, extras):
    return model(ids, mask, **extras)


def our_logits(model, inputs: dict) -> np.ndarray:
    """Logits [B, T, V] of the processor outputs `inputs` (Qwen2.5-VL's host-side layouts computed before jit)."""
    ids, mask = jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"])
    extras = {"pixel_values": jnp.asarray(inputs["pixel_values"])}
    if "image_grid_thw" in inputs:
        grids = inputs["image_grid_thw"]
        extras.update(positions=jnp.asarray(model.rope_index(inputs["input_ids"], grids, inputs["attention_mask"])[0]),
                      vision=model.vision_inputs(grids, num_patches=inputs["pixel_values"].shape[0]))
    else:
        extras["token_type_ids"] = jnp.asarray(inputs["token_type_ids"])
    return np.asarray(_forward(model, ids, mask, extras))


def hf_logits(hf, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return hf(**torch_inputs(inputs)).logits.numpy()


def _randomize_adapters(model, seed: int = 0) -> None:
    """Nonzero lora_b (fresh adapters have B = 0, which would export nothing)."""
    for i, layer in enumerate(l for l in linear_modules(model).values() if l.lora_a is not None):
        b = layer.lora_b[...]
        layer.lora_b = LoRAParam(0.2 * jax.random.normal(jax.random.key(seed * 1000 + i), b.shape, b.dtype))


@pytest.fixture(scope="module", params=["gemma3", "qwen2_5_vl"])
def adapted(request, tmp_path_factory):
    """(model_type, base checkpoint dir, our model with nonzero LoRA adapters, processor inputs, our logits)."""
    model_type, directory = request.param, tmp_path_factory.mktemp(request.param)
    tiny_vlm(model_type, directory, tie=False)
    model = AutoModelForImageTextToText.from_pretrained(directory)
    targets = apply_lora(model, r=2, alpha=4.0, target_modules=TARGETS, exclude_modules=EXCLUDE)
    assert sorted(targets) == sorted(n for n in linear_modules(model) if not n.endswith(EXCLUDE))
    _randomize_adapters(model)
    inputs = chat_inputs(load_processor(directory), "What is this?", images()[:1])
    return model_type, directory, model, inputs, our_logits(model, inputs)


def _has_processor_files(directory) -> None:
    for name in PROCESSOR_FILES:
        assert (directory / name).is_file(), name
    load_processor(directory)


def test_merged_export_loads_in_transformers_with_equal_logits(adapted, tmp_path):
    model_type, base, model, inputs, ours = adapted
    out = export_model(model, tmp_path / "merged", base_model_name_or_path=str(base), merge_lora=True)
    hf = HF_CLASS[model_type].from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(hf, inputs), ours, atol=2e-4, rtol=0)
    base_logits = hf_logits(HF_CLASS[model_type].from_pretrained(base).eval(), inputs)
    assert np.abs(base_logits - ours).max() > 1e-2  # the adapters matter
    _has_processor_files(out)
    assert adapters(AutoModelForImageTextToText.from_pretrained(out)) == {}


def test_peft_adapter_export_loads_in_peft_with_equal_logits(adapted, tmp_path):
    model_type, base, model, inputs, ours = adapted
    out = export_model(model, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((out / "adapter_config.json").read_text())
    runtime = {n for n, _ in HF_CLASS[model_type].from_pretrained(base).named_modules()}
    assert set(config["target_modules"]) <= runtime and len(config["target_modules"]) == len(adapters(model))
    assert "model.language_model.layers.0.self_attn.q_proj" in config["target_modules"]
    hf = peft.PeftModel.from_pretrained(HF_CLASS[model_type].from_pretrained(base).eval(), out).eval()
    np.testing.assert_allclose(hf_logits(hf, inputs), ours, atol=2e-4, rtol=0)
    _has_processor_files(out)
    # Back into our model: the same adapters under our names.
    again = AutoModelForImageTextToText.from_pretrained(base)
    assert sorted(load_peft_adapter(again, out)) == sorted(adapters(model))
    for name, (a, b) in adapters(again).items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(adapters(model)[name][0]))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(adapters(model)[name][1]))


def test_adapter_made_with_peft_loads_into_ours_with_equal_logits(adapted, tmp_path):
    model_type, base, _, inputs, _ = adapted
    torch.manual_seed(1)
    targets = ["q_proj", "v_proj", "fc1", "qkv", "down_proj", "lm_head"]  # both towers' attention and MLP, the head
    hf = peft.get_peft_model(HF_CLASS[model_type].from_pretrained(base).eval(),
                             peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False))
    hf.save_pretrained(tmp_path / "adapter")
    model = AutoModelForImageTextToText.from_pretrained(base)
    loaded = load_peft_adapter(model, tmp_path / "adapter")
    assert any(t.startswith(("vision_tower.", "visual.")) for t in loaded) and any("down_proj" in t for t in loaded)
    assert any(t.endswith("lm_head") for t in loaded)
    np.testing.assert_allclose(our_logits(model, inputs), hf_logits(hf.eval(), inputs), atol=2e-4, rtol=0)


def test_peft_name_map_round_trips_every_linear(adapted):
    from automodel_jax.checkpoint.peft_io import from_peft_name, to_peft_name
    model_type, base, model, _, _ = adapted
    runtime = {n for n, _ in HF_CLASS[model_type].from_pretrained(base).named_modules()}
    for name in linear_modules(model):
        if name.endswith(EXCLUDE):
            continue
        assert to_peft_name(name, model_type) in runtime, name
        assert from_peft_name(to_peft_name(name, model_type), model_type) == name
    assert model_type in PEFT_MODULE_NAMES


def test_peft_export_refuses_an_adapter_peft_cannot_hold(adapted, tmp_path):
    """Gemma 3's projector is a bare parameter in transformers: its adapter exports merged only."""
    model_type, base, _, _, _ = adapted
    model = AutoModelForImageTextToText.from_pretrained(base)
    apply_lora(model, r=2, alpha=4.0, target_modules="all-linear")
    if model_type == "gemma3":
        with pytest.raises(ValueError, match="mm_input_projection_weight .*merge_lora"):
            export_model(model, tmp_path / "adapter", base_model_name_or_path=str(base))
        assert not (tmp_path / "adapter").exists()
    else:  # every Linear of Qwen2.5-VL is one in transformers too
        export_model(model, tmp_path / "adapter", base_model_name_or_path=str(base))


def test_auto_class_checks_model_type_and_round_trips(tmp_path, hf_model_factory):
    _, text_dir = hf_model_factory("LlamaForCausalLM", "LlamaConfig")
    with pytest.raises(ValueError, match=r"'llama' is not a vision-language model; .*gemma3, qwen2_5_vl"):
        AutoModelForImageTextToText.from_pretrained(text_dir)
    with pytest.raises(ValueError, match="hf_config: model_type 'llama'"):
        AutoModelForImageTextToText.from_config(json.loads((text_dir / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(text_dir).config.vocab_size > 0  # text models load as before
    directory = tmp_path / "qwen"
    directory.mkdir()
    tiny_vlm("qwen2_5_vl", directory)
    model = AutoModelForImageTextToText.from_pretrained(directory)
    AutoModelForImageTextToText.save_pretrained(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "processor_config.json").is_file()
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved")
    for (p, x), (q, y) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                              nnx.to_flat_state(nnx.state(again, nnx.Param))):
        assert p == q and np.array_equal(np.asarray(x[...]), np.asarray(y[...]))
