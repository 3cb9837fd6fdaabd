"""LoRA adapters of every family exported in HF PEFT format load in `peft.PeftModel` with equal logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from automodel_jax import AutoModelForCausalLM
from automodel_jax.checkpoint.peft_io import save_peft_adapter
from automodel_jax.models.layers import LoRAParam
from automodel_jax.peft.lora import apply_lora
from reference import FAMILIES


@pytest.mark.parametrize("family", ["qwen2_tied", "qwen3", "mistral_sliding", "gemma2", "gemma3",
                                    "phi3_sliding_partial_rope"])
def test_adapter_export_loads_in_peft(hf_model_factory, tmp_path, family):
    import peft
    model_cls, config_cls, overrides = FAMILIES[family]
    hf, path = hf_model_factory(model_cls, config_cls, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path)
    targets = apply_lora(model, r=4, alpha=8.0, target_modules="all-linear", seed=1)
    graphdef, lora, rest = nnx.split(model, LoRAParam, ...)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), lora)
    model = nnx.merge(graphdef, lora, rest)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert sum("lora_A" in n for n, _ in ref.named_parameters()) == len(targets)
    ids = np.random.RandomState(0).randint(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, atol=1e-4)
