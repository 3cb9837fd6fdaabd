"""Every family's checkpoints: an HF sharded checkpoint loads, and our sharded export is bit-identical to it when
`transformers` reloads it (same tensor names, dtypes and values, so HF module names are kept exactly)."""
import json

import pytest
import torch
import transformers

from automodel_jax import AutoModelForCausalLM, save_pretrained
from reference import FAMILIES, assert_same_state


@pytest.mark.parametrize("name", FAMILIES)
def test_sharded_checkpoint_loads_and_exports_bit_identical(hf_model_factory, tmp_path, name):
    model_cls, config_cls, overrides = FAMILIES[name]
    hf, path = hf_model_factory(model_cls, config_cls, max_shard_size="20KB", **overrides)
    assert (path / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    save_pretrained(model, tmp_path / "out", max_shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert ("lm_head.weight" in index["weight_map"]) == (not hf.config.tie_word_embeddings)
    back = getattr(transformers, model_cls).from_pretrained(tmp_path / "out").eval()
    assert_same_state(hf, back)
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)
