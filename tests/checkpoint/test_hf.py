"""HF checkpoint load/export: bit-identical round trips through transformers, sharded files, the real stories260K
model decoding like HF torch, and every kind of bad checkpoint as a clear error."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from automodel_jax import AutoModelForCausalLM, save_pretrained
from automodel_jax.checkpoint.safetensors_io import CheckpointError
from reference import STORIES
from reference import assert_same_state as _assert_same_state


@pytest.mark.parametrize("tied", [False, True])
def test_export_round_trip_is_bit_identical(hf_llama_factory, tmp_path, tied):
    hf, path = hf_llama_factory(tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(path)
    save_pretrained(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _assert_same_state(hf, back)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    from safetensors import safe_open
    with safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)


def test_many_shards_load_and_round_trip(hf_llama_factory, tmp_path):
    hf, path = hf_llama_factory(max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    save_pretrained(model, tmp_path / "out", max_shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in hf.state_dict().values())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _assert_same_state(hf, back)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        np.testing.assert_array_equal(hf(ids).logits.numpy(), back(ids).logits.numpy())


def test_bf16_checkpoint_keeps_dtype_with_fp32_params(hf_llama_factory, tmp_path):
    hf, path = hf_llama_factory()
    hf = hf.to(torch.bfloat16)
    hf.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=jnp.float32)
    assert model.model.norm.scale[...].dtype == jnp.float32
    save_pretrained(model, tmp_path / "out")
    _assert_same_state(hf, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16))


def test_stories260k_greedy_decoding_matches_hf(assets, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    new = 60
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[1]]), max_new_tokens=new, do_sample=False, min_new_tokens=new)[0].numpy()
    forward = jax.jit(lambda ids: model(ids))
    tokens = np.zeros((1, 1 + new), np.int32)
    tokens[0, 0] = 1
    for t in range(new):
        tokens[0, t + 1] = int(jnp.argmax(forward(jnp.asarray(tokens))[0, t]))
    np.testing.assert_array_equal(tokens[0], ref)
    # the round trip keeps the tokenizer files
    save_pretrained(model, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (STORIES / name).read_bytes()


def test_missing_config(hf_llama_factory):
    _, path = hf_llama_factory()
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing config\.json"):
        AutoModelForCausalLM.from_pretrained(path)


def test_missing_path_is_clear():
    with pytest.raises(FileNotFoundError, match="'/nonexistent/model' is not a checkpoint directory"):
        AutoModelForCausalLM.from_pretrained("/nonexistent/model")


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "garbage_header"])
def test_corrupt_safetensors(hf_llama_factory, damage):
    _, path = hf_llama_factory()
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate_data": data[:-100], "truncate_header": data[:5],
                   "garbage_header": data[:8] + b"\xff" * 50 + data[58:]}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*(corrupt|truncated)"):
        AutoModelForCausalLM.from_pretrained(path)


def test_shape_disagreeing_with_config_names_tensor(hf_llama_factory):
    _, path = hf_llama_factory()
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight has shape "
                                              r"\[48, 80\] but config\.json implies \[48, 96\]"):
        AutoModelForCausalLM.from_pretrained(path)


def test_unsupported_model_type_lists_supported(hf_llama_factory):
    _, path = hf_llama_factory()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "bloom"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'bloom' is not supported; supported model types: .*llama"):
        AutoModelForCausalLM.from_pretrained(path)


def test_pickle_only_checkpoint_is_refused(hf_llama_factory):
    hf, path = hf_llama_factory()
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"found only pytorch_model\.bin \(pickle\), which is never loaded"):
        AutoModelForCausalLM.from_pretrained(path)


def test_export_refuses_non_empty_dir_unless_overwrite(hf_llama_factory, tmp_path):
    _, path = hf_llama_factory()
    model = AutoModelForCausalLM.from_pretrained(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=f"output directory {out} is not empty"):
        save_pretrained(model, out)
    assert (out / "keep.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt", "out"]  # no temporary left behind
    save_pretrained(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    shutil.rmtree(out)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_given_chat_template_replaces_the_sources_in_the_export(assets, tmp_path, legacy):
    """chat_template.jinja (read first by transformers) and, where the source keeps one there, tokenizer_config.json's
    `chat_template` (older readers) both become the given template."""
    source = tmp_path / "source"
    shutil.copytree(STORIES, source)
    config = json.loads((source / "tokenizer_config.json").read_text())
    if legacy:
        (source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'old' }}"}))
    else:
        (source / "chat_template.jinja").write_text("{{ 'old' }}")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    save_pretrained(AutoModelForCausalLM.from_pretrained(source), tmp_path / "out", chat_template=template)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == template
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()).get("chat_template") == (
        template if legacy else None)
    save_pretrained(AutoModelForCausalLM.from_pretrained(source), tmp_path / "kept")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "kept").chat_template == "{{ 'old' }}"


IDS = np.random.default_rng(1).integers(0, 101, size=(2, 9))


def _doctor(path, tie: bool, edit) -> None:
    """Set config.json's tie_word_embeddings and edit the stored tensors ({name: array}) in place."""
    from safetensors.numpy import load_file, save_file
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": tie}))
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _same_logits_as_transformers(path):
    """Our model of `path`, after checking its logits equal transformers' (which loads it with its own rules)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ref = hf(torch.as_tensor(IDS)).logits.numpy()
    model = AutoModelForCausalLM.from_pretrained(path)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), ref, atol=1e-5, rtol=1e-5)
    return model


def test_a_tied_config_with_a_different_stored_head_loads_untied_with_a_warning(hf_llama_factory, tmp_path, caplog):
    _, path = hf_llama_factory()
    _doctor(path, True, lambda t: None)
    model = _same_logits_as_transformers(path)
    assert not model.config.tie_word_embeddings
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "lm_head.weight" in warning and "model.embed_tokens.weight" in warning and "tie_word_embeddings=false" \
        in warning
    save_pretrained(model, tmp_path / "out")  # the export says what it is: untied, both tensors stored
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    caplog.clear()
    _same_logits_as_transformers(tmp_path / "out")
    assert not caplog.records


@pytest.mark.parametrize("stored", ["equal_head", "head_only"])
def test_a_tied_config_ties_a_stored_head_equal_to_the_embedding_or_stored_alone(hf_llama_factory, caplog, stored):
    def edit(t):
        if stored == "equal_head":
            t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
        else:
            del t["model.embed_tokens.weight"]
    _, path = hf_llama_factory()
    _doctor(path, True, edit)
    assert _same_logits_as_transformers(path).config.tie_word_embeddings
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.parametrize("tie, edit, kind, match", [
    (False, lambda t: t.pop("lm_head.weight"), "missing_keys",
     r"tie_word_embeddings=false but the checkpoint has no lm_head\.weight .*set tie_word_embeddings=true"),
    (False, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing_keys",
     r"lacks 1 tensor\(s\) .*: model\.layers\.1\.mlp\.up_proj\.weight \(transformers would initialise"),
    (False, lambda t: t.update({f"model.extra.{i}.weight": np.ones((3, 3), np.float32) for i in range(5)}),
     "unexpected_keys", r"has 5 tensor\(s\) .*: model\.extra\.0\.weight, model\.extra\.1\.weight, "
                        r"model\.extra\.2\.weight and 2 more \(transformers would drop them\)"),
    (True, lambda t: [t.pop("model.embed_tokens.weight"), t.pop("lm_head.weight")], "missing_keys",
     r"lacks 1 tensor\(s\) .*: model\.embed_tokens\.weight"),
], ids=["untied_without_head", "missing_layer_weight", "extra_tensors", "tied_without_either"])
def test_tensors_that_transformers_would_invent_or_drop_are_a_clear_error(hf_llama_factory, tie, edit, kind, match):
    _, path = hf_llama_factory()
    _doctor(path, tie, edit)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert info[kind], info  # transformers loads it anyway: randomly initialised or dropped tensors
    with pytest.raises(CheckpointError, match=match) as error:
        AutoModelForCausalLM.from_pretrained(path)
    assert "\n" not in str(error.value)


def test_a_tensor_stored_in_two_shards_is_a_clear_error(hf_llama_factory):
    """transformers silently keeps one of the two (the later shard's); which was meant is unknowable, so refuse."""
    from safetensors.numpy import load_file, save_file
    _, path = hf_llama_factory(max_shard_size="20KB")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.up_proj.weight"
    other = max(set(weight_map.values()) - {weight_map[name]})
    tensors = load_file(path / other)
    save_file({**tensors, name: np.ones((80, 48), np.float32)}, path / other, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {name} is stored in both {weight_map[name]} and {other}"):
        AutoModelForCausalLM.from_pretrained(path)
