"""Run in a fresh process with 8 simulated CPU devices (XLA_FLAGS is set before jax is imported).

`python tests/models/scan_mesh_program.py OUT_DIR` trains the tiny 3-layer Llama of test_scan_layers unrolled and
scanned (LoRA and full SFT) on fsdp=8 and fsdp=2 x tensor=4 meshes and on one device, and writes record.json: losses
per run, the largest difference of final parameters scanned vs unrolled, and the specs of stacked parameters.
tests/models/test_scan_layers.py checks it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # before jax is imported
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: reference, models.test_scan_layers

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

MESHES = {"one": None, "fsdp8": dict(fsdp=8), "fsdp2_tensor4": dict(fsdp=2, tensor=4)}
# Heads 8 and kv heads 4 so that tensor=4 divides both.
SHAPE = dict(num_attention_heads=8, num_key_value_heads=4, hidden_size=64, intermediate_size=64)


def normal_spec(spec) -> str:
    """The spec without trailing Nones (jax versions differ in whether they keep them)."""
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return str(tuple(spec))


def main(out_dir: str) -> None:
    from models import test_scan_layers as t
    from automodel_jax.models.base import build_model
    from automodel_jax.peft.lora import apply_lora
    t.LLAMA.update(SHAPE)
    record = {"devices": jax.device_count()}
    for method in ("lora", "sft"):
        for name, mesh_cfg in MESHES.items():
            runs = {}
            for scanned in (False, True):
                model = build_model(t.LLAMA, seed=0)
                if scanned:
                    model = t.scanned_copy(model)
                if method == "lora":
                    apply_lora(model, r=4, alpha=8.0, target_modules=("*_proj",), seed=1)
                runs[scanned] = t.train_steps(model, lora=method == "lora", mesh_cfg=mesh_cfg)
            (losses_u, params_u, _, _), (losses_s, params_s, _, state_s) = runs[False], runs[True]
            specs = {".".join(map(str, p)): normal_spec(x.sharding.spec) for p, x in t.flatten(state_s).items()
                     if t.stacked_at(p) is not None}
            record[f"{method}/{name}"] = dict(
                losses_unrolled=losses_u, losses_scanned=losses_s, specs=specs,
                max_param_diff=max(float(np.max(np.abs(params_s[p] - x))) for p, x in params_u.items()))
    record["load_export"] = load_and_export(Path(out_dir))
    (Path(out_dir) / "record.json").write_text(json.dumps(record, indent=1))


def load_and_export(out: Path) -> dict:
    """An HF checkpoint (written by transformers) loaded scanned onto fsdp=2 x tensor=4 and exported: whether every
    exported file equals the unrolled export's byte for byte, and the loaded q_proj kernel's spec."""
    import torch
    import transformers
    from models import test_scan_layers as t
    from automodel_jax.checkpoint.hf import load_pretrained, save_pretrained
    from automodel_jax.parallel.sharding import mesh_from_config
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{k: v for k, v in t.LLAMA.items() if k != "model_type"})
    transformers.LlamaForCausalLM(config).save_pretrained(out / "hf", max_shard_size="100KB")
    mesh, rules = mesh_from_config(dict(fsdp=2, tensor=4))
    for scanned in (False, True):
        model = load_pretrained(out / "hf", mesh=mesh, rules=rules,
                                model_overrides=dict(scan_layers=True) if scanned else None)
        save_pretrained(model, out / f"export_{scanned}", max_shard_size="100KB")
    files = sorted(p.name for p in (out / "export_False").iterdir())
    same = files == sorted(p.name for p in (out / "export_True").iterdir()) and all(
        (out / "export_True" / f).read_bytes() == (out / "export_False" / f).read_bytes() for f in files)
    return dict(files=files, identical=same,
                q_proj_spec=normal_spec(model.model.layers.self_attn.q_proj.kernel[...].sharding.spec))


if __name__ == "__main__":
    main(sys.argv[1])
