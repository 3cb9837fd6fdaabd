"""Run in a fresh process with 8 simulated CPU devices (XLA_FLAGS is set before jax is imported).

`python -m tests.parallel.mesh_program OUT_DIR` trains a tiny Llama for three steps (LoRA with dropout, and full
SFT) on one device and on each mesh of MESHES with the naive loss, and on one device and each mesh of
VARIANT_MESHES with each of VARIANTS (the default chunked loss; packed rows), through the recipe's own step builders,
and writes per run: losses and gradient norms, the final trainable parameters (npz), and the PartitionSpecs of
parameters, optimizer moments and (under `constrain`) activations as strings (json).
tests/parallel/test_mesh_equivalence.py compares them.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported; the test imports MESHES from here without these effects
    # 8 simulated devices; the other two flags only cut CPU compile time (every run here compiles with the same ones).
    os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                               "--xla_llvm_disable_expensive_passes=true")
    os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from automodel_jax import AutoModelForCausalLM  # noqa: E402
from automodel_jax.data.loader import make_loader  # noqa: E402
from automodel_jax.models.params import flatten, path_str  # noqa: E402
from automodel_jax.parallel.sharding import (check_mesh_fits, constrain, context_parallel, gather_kv,  # noqa: E402
                                             mesh_from_config, sharding_rules, tree_shardings)
from automodel_jax.peft.lora import apply_lora, split_model  # noqa: E402
from automodel_jax.training.optim import build_optimizer, optim_defaults  # noqa: E402
from automodel_jax.training.step import compile_steps, init_state, make_eval_step, make_train_step  # noqa: E402

# Heads 8 and kv heads 4 (GQA) so that tensor=4 divides both; every other dim divides 8.
TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
            tie_word_embeddings=False)
MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(fsdp=8),
    "fsdp2_tensor4": dict(fsdp=2, tensor=4),
    "data2_fsdp2_context2": dict(data=2, fsdp=2, context=2),
    "tensor2_context4": dict(tensor=2, context=4),
    "zero3_data4_fsdp2": dict(data=4, fsdp=2, zero3_over_data=True),
}
# Loss and batch layouts beyond the naive loss on right-padded rows, run (for `methods`) on one device and
# VARIANT_MESHES: the default config's loss (chunked, default chunk size), and rows packed by the loader's first-fit
# packing (several samples a row: segment ids 1..n, positions restarting) through the chunked loss with chunks smaller
# than a batch (LoRA only: full SFT adds no packing-specific path).
VARIANTS = {
    "chunked": dict(methods=("lora", "sft"), settings=dict(loss_impl="chunked", chunk_size=None, packed=False)),
    "packed": dict(methods=("lora",), settings=dict(loss_impl="chunked", chunk_size=48, packed=True)),
}
VARIANT_MESHES = ("fsdp8", "fsdp2_tensor4")
ACCUM, ROWS, SEQ, STEPS = 2, 8, 16, 3
# Parameters, optimizer moments and LoRA factors whose specs the test checks.
SPEC_PATHS = {
    "q_proj": ("model", "layers", 0, "self_attn", "q_proj", "kernel"),
    "o_proj": ("model", "layers", 0, "self_attn", "o_proj", "kernel"),
    "embedding": ("model", "embed_tokens", "embedding"),
    "lm_head": ("lm_head", "kernel"),
    "q_lora_a": ("model", "layers", 0, "self_attn", "q_proj", "lora_a"),
    "q_lora_b": ("model", "layers", 0, "self_attn", "q_proj", "lora_b"),
}


def batches() -> list[dict[str, np.ndarray]]:
    """STEPS global batches [ACCUM, ROWS, SEQ] of right-padded rows, labels ignored on padding and prompt."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        lengths = rng.integers(4, SEQ + 1, size=(ACCUM, ROWS))
        real = np.arange(SEQ)[None, None, :] < lengths[..., None]
        ids = rng.integers(0, TINY["vocab_size"], size=(ACCUM, ROWS, SEQ))
        labels = np.where(real & (np.arange(SEQ) >= 2), rng.integers(0, TINY["vocab_size"], ids.shape), -100)
        out.append(dict(input_ids=np.where(real, ids, 0).astype(np.int32), labels=labels.astype(np.int32),
                        segment_ids=real.astype(np.int32),
                        positions=np.where(real, np.arange(SEQ), 0).astype(np.int32)))
    return out


def packed_batches() -> list[dict[str, np.ndarray]]:
    """STEPS global batches [ACCUM, ROWS, SEQ] of rows packed by the data loader from samples of 3 to SEQ // 2 tokens
    (labels ignored on each sample's first token)."""
    rng = np.random.default_rng(1)
    samples = []
    for length in rng.integers(3, SEQ // 2 + 1, size=200):
        labels = rng.integers(0, TINY["vocab_size"], length)
        labels[0] = -100
        samples.append(dict(input_ids=rng.integers(0, TINY["vocab_size"], length).astype(np.int32),
                            labels=labels.astype(np.int32)))
    loader = make_loader(samples, batch_size=ACCUM * ROWS, seq_len=SEQ, pad_id=0, seed=0, packing=True)
    return [{key: value.reshape(ACCUM, ROWS, SEQ) for key, value in next(loader).items()} for _ in range(STEPS)]


def optimizer():
    cfg = optim_defaults()
    cfg.update(name="adamw", learning_rate=1e-2, weight_decay=0.01)
    return build_optimizer(cfg, STEPS)


def spec_str(sharding) -> str:
    """The spec without trailing Nones (jax versions differ in whether they keep them)."""
    return normal_spec(tuple(sharding.spec))


def normal_spec(spec: tuple) -> str:
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return str(tuple(spec))


def train(mesh_cfg: dict | None, lora: bool, loss_impl: str = "naive", chunk_size: int | None = None,
          packed: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Three steps on the mesh (None = one device) with the given loss implementation, on right-padded or packed
    rows; (json-able record, final trainable params by path)."""
    mesh, rules = mesh_from_config(mesh_cfg or {}, devices=None if mesh_cfg else jax.devices()[:1])
    check_mesh_fits(mesh.shape, num_heads=TINY["num_attention_heads"], num_kv_heads=TINY["num_key_value_heads"],
                    seq_len=SEQ, batch_rows=ROWS)
    model = AutoModelForCausalLM.from_config(TINY, seed=0)
    if lora:
        apply_lora(model, r=4, alpha=8.0, dropout=0.1, target_modules=("*_proj",), seed=1)
    opt, schedule = optimizer()
    graphdef, trainable, frozen = split_model(model, lora)
    state, shardings = init_state(trainable, opt, 0, tree_shardings(model, trainable, mesh, rules))
    frozen_shardings = tree_shardings(model, frozen, mesh, rules)
    frozen = jax.device_put(frozen, frozen_shardings)
    kw = dict(loss_impl=loss_impl, chunk_size=chunk_size, max_segments=None if packed else 1)
    train_step, _, batch_3d, _ = compile_steps(
        make_train_step(graphdef, opt, schedule, grad_shardings=shardings["params"], **kw),
        make_eval_step(graphdef, **kw), shardings, frozen_shardings, mesh, rules)
    losses, norms = [], []
    for batch in packed_batches() if packed else batches():
        state, metrics = train_step(state, frozen, jax.device_put(batch, batch_3d))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    params = {path_str(p): np.asarray(x) for p, x in flatten(state["params"]).items()}
    all_params = {**flatten(state["params"]), **flatten(frozen)}
    specs = {name: spec_str(all_params[path].sharding) for name, path in SPEC_PATHS.items() if path in all_params}
    moment_path = SPEC_PATHS["q_lora_a" if lora else "q_proj"]
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        names = tuple(getattr(k, "name", getattr(k, "key", None)) for k in key_path)
        if names[-len(moment_path) - 1:] in (("mu",) + moment_path, ("nu",) + moment_path):
            specs[names[-len(moment_path) - 1]] = spec_str(leaf.sharding)
        elif names[-1] == "count":
            specs["count"] = spec_str(leaf.sharding)
    return dict(losses=losses, grad_norms=norms, specs=specs), params


def constrained_specs() -> dict[str, str]:
    """Output shardings of `constrain` inside jit under fsdp=2 x tensor=2 x context=2."""
    mesh, rules = mesh_from_config(dict(fsdp=2, tensor=2, context=2))

    def pin(x):
        return constrain(x, ("batch", "seq", "mlp")), constrain(x, ("batch", None, "embed"))
    with sharding_rules(mesh, rules):
        mlp, embed = jax.jit(pin)(jax.numpy.ones((4, 8, 16)))
        k, _ = jax.jit(lambda x: gather_kv(x, x))(jax.numpy.ones((4, 8, 2, 4)))
        sequence_sharded = context_parallel()
    return dict(mlp=spec_str(mlp.sharding), embed=spec_str(embed.sharding), gathered_kv=spec_str(k.sharding),
                context_parallel=sequence_sharded)


def main(out_dir: str) -> None:
    out = Path(out_dir)
    record = {"devices": jax.device_count(), "constrain": constrained_specs(),
              "packed_segments": [int(batch["segment_ids"].max()) for batch in packed_batches()]}
    for method in ("lora", "sft"):
        for name, mesh_cfg in {"one": None, **MESHES}.items():
            record[f"{method}/{name}"], params = train(mesh_cfg, method == "lora")
            np.savez(out / f"{method}_{name}.npz", **params)
        for variant, spec in VARIANTS.items():
            if method not in spec["methods"]:
                continue
            for name in ("one",) + VARIANT_MESHES:
                record[f"{method}/{variant}/{name}"], params = train(MESHES.get(name), method == "lora",
                                                                     **spec["settings"])
                np.savez(out / f"{method}_{variant}_{name}.npz", **params)
    (out / "record.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
