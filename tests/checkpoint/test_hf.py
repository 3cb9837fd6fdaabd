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
