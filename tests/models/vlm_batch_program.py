"""Run in a fresh process with 8 simulated CPU devices (XLA_FLAGS is set before jax is imported).

`python -m tests.models.vlm_batch_program MODEL_TYPE [train]` (gemma3 or qwen2_5_vl) builds a tiny random VLM, collates 8
rows of different image counts (and, for Qwen2.5-VL, image sizes) in the VLM collator's per-row layout, turns them
into step inputs with the model's `host_batch`, and computes the logits inside jit on one device and with every batch
array sharded over its leading axis on a data=4 x fsdp=2 mesh (parameters sharded by the rule table, activations
constrained as in training). Prints one JSON line: devices, the largest logit difference on real tokens, the logits'
batch-axis sharding and whether they are finite; `run` (used by test_gemma3_vl.py / test_qwen2_5_vl.py) returns it.
With `train`: 3 full-SFT steps of the training step (vision tower included) on one device, on fsdp=8 and on
fsdp=4 x tensor=2; prints the largest difference of each step's loss and of the final parameters from one device.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before jax is imported
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from automodel_jax import AutoModelForCausalLM  # noqa: E402
from automodel_jax.data.vlm_batches import VLMCollator  # noqa: E402
from automodel_jax.models.attention import AttentionInputs  # noqa: E402
from automodel_jax.parallel.sharding import (DEFAULT_RULES, activation_sharding, make_mesh,  # noqa: E402
                                             tree_shardings, with_sharding_rules)

REPO = Path(__file__).resolve().parents[2]
ROWS = 8
STEP_KEYS = ("input_ids", "labels", "segment_ids", "positions")
GEMMA = dict(model_type="gemma3", mm_tokens_per_image=4, image_token_index=290, boi_token_index=288,
             eoi_token_index=289,
             text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=10,
                              sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
             vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8, vision_use_head=False))
QWEN = dict(model_type="qwen2_5_vl", image_token_id=120, video_token_id=121, vision_start_token_id=122,
            vision_end_token_id=123,
            text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=100.0)),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4,
                               temporal_patch_size=2, spatial_merge_size=2, window_size=16, out_hidden_size=64,
                               fullatt_block_indexes=[1]))
QWEN_GRIDS = np.array([[1, 4, 4], [1, 4, 8], [1, 8, 4]])


def run(model_type: str, *mode: str) -> dict:
    """This program's JSON record for `model_type`, from a fresh process (the caller's jax keeps its devices)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, "-m", "tests.models.vlm_batch_program", model_type, *mode], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def collated(model_type: str) -> dict[str, np.ndarray]:
    """ROWS right-padded rows with 0, 1 or 2 images each (max_images 2), in the VLM collator's layout."""
    rng = np.random.default_rng(0)
    samples = []
    for r in range(ROWS):
        ids, images = [2], []
        for _ in range(r % 3):
            if model_type == "gemma3":
                ids += [288] + [290] * 4 + [289]
                images.append(rng.standard_normal((3, 32, 32), np.float32))
            else:
                grid = QWEN_GRIDS[rng.integers(len(QWEN_GRIDS))]
                ids += [122] + [120] * (int(grid.prod()) // 4) + [123]
                images.append(grid)
            ids += list(rng.integers(3, 100, rng.integers(1, 4)))
        ids = np.asarray(ids)
        sample = dict(input_ids=ids, labels=np.roll(ids, -1), token_type_ids=(ids == 290) | (ids == 120))
        if model_type == "gemma3":
            sample["pixel_values"] = np.zeros((0, 3, 32, 32), np.float32) if not images else np.stack(images)
        else:
            grids = np.asarray(images, np.int64).reshape(-1, 3)
            sample["image_grid_thw"] = grids
            sample["pixel_values"] = rng.standard_normal((int(grids.prod(axis=1).sum()), 96), np.float32)
        samples.append(sample)
    if model_type == "gemma3":
        collate = VLMCollator(model_type="gemma3", seq_len=24, max_images=2, pad_id=0, pixel_shape=(3, 32, 32))
    else:
        collate = VLMCollator(model_type="qwen2_5_vl", seq_len=48, max_images=2, pad_id=0, pixel_shape=(96,),
                              max_patches=64)
    return collate(samples)


def main(model_type: str) -> None:
    model = AutoModelForCausalLM.from_config(GEMMA if model_type == "gemma3" else QWEN)
    batch = type(model).host_batch(model.config, collated(model_type))
    graphdef, state = nnx.split(model)

    def logits(state, batch):
        m = nnx.merge(graphdef, state)
        inputs = AttentionInputs(batch["segment_ids"], batch["positions"])
        extra = {k: v for k, v in batch.items() if k not in STEP_KEYS}
        return m.logits(m.hidden_states(batch["input_ids"], inputs, **extra))

    one = np.asarray(jax.jit(logits)(state, batch))
    # data x fsdp = 8 over the batch axis (the trainer's "batch" rule), parameters sharded over fsdp by the rule
    # table, activations constrained as in training.
    mesh, rules = make_mesh(dict(data=4, fsdp=2)), DEFAULT_RULES
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, jax.device_put(pure, tree_shardings(model, pure, mesh, rules)))
    rows = activation_sharding(mesh, ("batch",), rules)
    sharded_batch = {k: jax.device_put(v, rows) for k, v in batch.items()}
    out = jax.jit(with_sharding_rules(logits, mesh, rules))(state, sharded_batch)
    real = batch["segment_ids"] != 0
    print(json.dumps(dict(devices=len(jax.devices()), max_diff=float(np.abs(np.asarray(out) - one)[real].max()),
                          spec=str(tuple(out.sharding.spec)[:1]), finite=bool(np.isfinite(one).all()),
                          pixel_values=list(batch["pixel_values"].shape))))


def train(model_type: str, steps: int = 3) -> None:
    """Losses of `steps` full-SFT steps and the final parameters, per mesh, against one device."""
    from automodel_jax.peft.lora import split_model
    from automodel_jax.training.optim import build_optimizer, optim_defaults
    from automodel_jax.training.step import compile_steps, init_state, make_eval_step, make_train_step
    hf_config = GEMMA if model_type == "gemma3" else QWEN
    probe = AutoModelForCausalLM.from_config(hf_config)
    batch = type(probe).host_batch(probe.config, collated(model_type))
    ranks = {k: v.ndim - 1 for k, v in batch.items()}
    batch = {k: v[None] for k, v in batch.items()}  # one micro-batch: [accum=1, rows, ...]
    optim = optim_defaults()
    optim.update(name="adamw", learning_rate=1e-4)

    def trained(shape):
        model = AutoModelForCausalLM.from_config(hf_config)
        mesh, rules = make_mesh(shape, jax.devices() if shape else None), DEFAULT_RULES
        optimizer, schedule = build_optimizer(optim, 10)
        graphdef, trainable, frozen = split_model(model, lora=False)
        state, shardings = init_state(trainable, optimizer, 0, tree_shardings(model, trainable, mesh, rules))
        kw = dict(loss_impl="chunked", max_segments=1)
        step, _, batch_3d, _ = compile_steps(make_train_step(graphdef, optimizer, schedule,
                                                             grad_shardings=shardings["params"], **kw),
                                             make_eval_step(graphdef, **kw), shardings, {}, mesh, rules, ranks)
        placed = {k: jax.device_put(v, batch_3d[k]) for k, v in batch.items()}
        losses = []
        for _ in range(steps):
            state, metrics = step(state, {}, placed)
            losses.append(float(metrics["loss"]))
        return losses, jax.tree.leaves(jax.device_get(state["params"]))

    one_losses, one_params = trained(None)
    record = dict(devices=len(jax.devices()), losses=one_losses)
    for name, shape in (("fsdp8", dict(fsdp=8)), ("fsdp4_tensor2", dict(fsdp=4, tensor=2))):
        losses, params = trained(shape)
        record[name] = dict(loss_diff=max(abs(a - b) for a, b in zip(losses, one_losses)),
                            param_diff=max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                           for a, b in zip(params, one_params)))
    print(json.dumps(record))


if __name__ == "__main__":
    train(sys.argv[1]) if sys.argv[2:] == ["train"] else main(sys.argv[1])
