"""A PEFT adapter loaded into a sharded model lands on the model's shardings (8 simulated CPU devices, fsdp=4 x
tensor=2, in a fresh process): every lora_A/lora_B on its rule-table sharding, an lm_head weight saved with the
adapter on the base kernel's sharding, and the logits equal PEFT's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np

IDS = [[5, 17, 42, 8, 99, 3], [7, 7, 300, 511, 2, 64]]


def _sharded_load(model_dir: str, adapter_dir: str) -> None:
    """(In the 8-device process.) Load through load_for_inference on the mesh; print one JSON line."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from automodel_jax.auto import load_for_inference
    from automodel_jax.models.layers import Linear
    from automodel_jax.parallel.sharding import make_mesh, param_shardings

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    model, _ = load_for_inference(model_dir, adapter_dir, mesh=mesh)
    placed = {}
    for path, layer in nnx.iter_graph(model):
        if isinstance(layer, Linear) and layer.lora_a is not None:
            leaves = {tuple(path) + (leaf,): getattr(layer, leaf)[...] for leaf in ("lora_a", "lora_b", "kernel")}
            rule = param_shardings(model, {p: x.shape for p, x in leaves.items()}, mesh)
            placed.update({".".join(map(str, p)): [list(x.sharding.spec), x.sharding == rule[p]]
                           for p, x in leaves.items()})
    logits = nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(IDS))
    print(json.dumps(dict(devices=jax.device_count(), placed=placed, logits=np.asarray(logits).tolist())))


def test_adapter_lands_on_model_shardings(hf_llama_factory, tmp_path):
    import peft
    import torch

    from reference import STORIES
    hf, path = hf_llama_factory(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(STORIES / name, path / name)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "k_proj", "down_proj", "lm_head"]))
    ref.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = ref.eval()(torch.tensor(IDS)).logits.numpy()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, __file__, str(path), str(tmp_path / "adapter")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["devices"] == 8
    placed = record["placed"]
    assert len(placed) == 3 * (2 * 3 + 1)  # (lora_a, lora_b, kernel) of 2 layers x 3 modules and lm_head
    assert all(ok for _, ok in placed.values()), {k: v for k, v in placed.items() if not v[1]}
    assert placed["model.layers.0.self_attn.q_proj.lora_a"][0] == ["fsdp", None]
    assert placed["lm_head.lora_b"][0] == [None, "tensor"]
    assert placed["lm_head.kernel"][0] == ["fsdp", "tensor"]
    np.testing.assert_allclose(np.asarray(record["logits"]), want, atol=1e-5)


if __name__ == "__main__":
    _sharded_load(*sys.argv[1:])
