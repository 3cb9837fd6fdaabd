"""TrainCheckpoints for real: exact round trips of train state and data position, keep-last-K and keep-best, resume
rules, mismatch errors, failing saves, and restoring onto another device count (an 8-device CPU subprocess)."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from automodel_jax import AutoModelForCausalLM
from automodel_jax.checkpoint.orbax_io import TrainCheckpoints, locate, save_params_checkpoint
from automodel_jax.checkpoint.safetensors_io import CheckpointError
from automodel_jax.config import ConfigError
from automodel_jax.data import make_loader
from automodel_jax.recipes.llm.finetune import default_config
from automodel_jax.parallel.sharding import make_mesh
from automodel_jax.peft.lora import apply_lora
from automodel_jax.training.optim import build_optimizer
from automodel_jax.parallel.sharding import tree_shardings
from automodel_jax.peft.lora import split_model
from automodel_jax.training.step import init_state

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
SAMPLES = [dict(input_ids=np.arange(i % 7 + 2, dtype=np.int32), labels=np.arange(i % 7 + 2, dtype=np.int32))
           for i in range(40)]


def config(run_dir, **checkpoint):
    cfg = default_config()
    cfg.run_dir = str(run_dir)
    cfg.checkpoint.update(checkpoint)
    return cfg


def lora_model(r=4, alpha=8.0, targets=("*_proj",), **overrides):
    model = AutoModelForCausalLM.from_config({**TINY, **overrides}, seed=0)
    apply_lora(model, r=r, alpha=alpha, target_modules=targets)
    return model


def train_state(model, mesh, seed=0):
    """A LoRA train state on `mesh` whose every number leaf holds distinct values (as after some training)."""
    _, trainable, _ = split_model(model, True)
    state, shardings = init_state(trainable, build_optimizer(default_config().optim, 10)[0], 0,
                                  tree_shardings(model, trainable, mesh))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = [x if x.dtype == bool else jax.random.randint(k, x.shape, 0, 1000, x.dtype) if x.dtype.kind in "iu" else
              jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]  # bool: the "ok" latch, True
    return jax.device_put(jax.tree.unflatten(treedef, values), shardings), shardings


def loader():
    return make_loader(SAMPLES, batch_size=4, seq_len=8, pad_id=0, seed=0)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


def save_run(run_dir, model, state, steps, val_losses=None, **checkpoint):
    """Save `state` at each of `steps` (with validation losses) through TrainCheckpoints, as the recipe does."""
    ck = TrainCheckpoints(config(run_dir, every_steps=1, **checkpoint), model, total_steps=max(steps) + 1)
    batches = loader()
    for step in steps:
        next(batches)
        ck.save(step, state, batches, (val_losses or {}).get(step))
    ck.close()
    return batches


def test_round_trip_is_exact_and_resumes_the_data_position(tmp_path):
    model, mesh = lora_model(), make_mesh()
    state, shardings = train_state(model, mesh, seed=1)
    saved_loader = save_run(tmp_path, model, state, [1, 2, 3])
    fresh, _ = train_state(model, mesh, seed=2)
    resumed_loader = loader()
    restored = TrainCheckpoints(config(tmp_path), model, 10).restore(fresh, shardings, resumed_loader)
    assert_trees_equal(restored, state)
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    assert int(restored["step"]) == int(state["step"])
    for _ in range(3):
        np.testing.assert_array_equal(next(resumed_loader)["input_ids"], next(saved_loader)["input_ids"])


def test_keeps_the_last_k_and_the_best_by_validation_loss(tmp_path):
    model = lora_model()
    state, _ = train_state(model, make_mesh())
    save_run(tmp_path, model, state, [1, 2, 3, 4, 5, 6], {2: 0.5, 4: 0.9, 6: 0.8}, keep=2, keep_best=1)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 5, 6]
    assert locate(tmp_path) == ((tmp_path / "checkpoints").absolute(), 6)
    assert locate(tmp_path / "2") == ((tmp_path / "checkpoints").absolute(), 2)


def test_restore_from_seeds_a_fresh_run_dir_and_the_runs_own_checkpoints_win(tmp_path):
    model, mesh = lora_model(), make_mesh()
    first, shardings = train_state(model, mesh, seed=1)
    second, _ = train_state(model, mesh, seed=2)
    save_run(tmp_path / "a", model, first, [4])
    cfg = config(tmp_path / "b", restore_from=str(tmp_path / "a" / "checkpoints" / "4"))
    assert_trees_equal(TrainCheckpoints(cfg, model, 10).restore(second, shardings, loader()), first)
    save_run(tmp_path / "b", model, second, [6])
    assert_trees_equal(TrainCheckpoints(cfg, model, 10).restore(first, shardings, loader()), second)
    assert TrainCheckpoints(config(tmp_path / "c"), model, 10).restore(first, shardings, loader()) is first


@pytest.mark.parametrize("other, message", [
    (dict(r=8), r"trained with LoRA r=4 but the config says r=8 \(peft.r\)"),
    (dict(alpha=16.0), r"trained with LoRA alpha=8.0 but the config says alpha=16.0 \(peft.alpha\)"),
    (dict(targets=("q_proj",)), r"LoRA targets=14 modules .* but the config says targets=2 modules"),
    (dict(hidden_size=48), r"trained on a model with hidden_size=32, but the model at .* has hidden_size=48"),
])
def test_a_checkpoint_of_another_lora_shape_or_model_is_refused_by_name(tmp_path, other, message):
    model = lora_model()
    save_run(tmp_path, model, train_state(model, make_mesh())[0], [2])
    with pytest.raises(CheckpointError, match=message):
        TrainCheckpoints(config(tmp_path), lora_model(**other), 10)


def test_full_fine_tuning_and_parameter_checkpoints_cannot_resume_lora(tmp_path):
    model = lora_model()
    save_run(tmp_path / "lora", model, train_state(model, make_mesh())[0], [2])
    with pytest.raises(CheckpointError, match="peft.method='lora' but the config says peft.method='none'"):
        TrainCheckpoints(config(tmp_path / "lora"), AutoModelForCausalLM.from_config(TINY), 10)
    save_params_checkpoint(model, tmp_path / "params", model_path="tiny")
    with pytest.raises(CheckpointError, match="holds parameters only"):
        TrainCheckpoints(config(tmp_path / "new", restore_from=str(tmp_path / "params")), model, 10)


def test_bad_paths_and_settings_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass a run directory"):
        locate(tmp_path / "missing")
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        locate(tmp_path)
    with pytest.raises(ConfigError, match="checkpoint.keep must be >= 1, got 0"):
        TrainCheckpoints(config(tmp_path, keep=0), lora_model(), 10)


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_a_failing_save_is_a_clear_error_and_earlier_checkpoints_stay(tmp_path, fault):
    if fault == "read_only" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the disk_full case covers failing writes")
    model, mesh = lora_model(), make_mesh()
    state, shardings = train_state(model, mesh)
    batches = loader()
    ck = TrainCheckpoints(config(tmp_path, every_steps=1), model, 10)
    ck.save(1, state, batches)
    ck.wait()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if fault == "disk_full":  # files stop growing past 1 KiB: writes fail as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limit[1]))
    else:
        (tmp_path / "checkpoints").chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match=r"saving checkpoint step 2 under .* failed .*earlier checkpoints "
                                                  r"are intact \(steps \[1\]\); check free disk space"):
            ck.save(2, state, batches)
            ck.close()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
        (tmp_path / "checkpoints").chmod(0o755)
    restored = TrainCheckpoints(config(tmp_path), model, 10).restore(train_state(model, mesh, 5)[0], shardings,
                                                                     loader())
    assert_trees_equal(restored, state)


def _mesh_program(run_dir: str, expected: str) -> None:
    """In an 8-device process: restore the 1-device checkpoint onto fsdp=8 and check it; save one for the reverse."""
    assert jax.device_count() == 8
    model, mesh = lora_model(), make_mesh({"fsdp": 8})
    state, shardings = train_state(model, mesh, seed=3)
    restored = TrainCheckpoints(config(Path(run_dir) / "one"), model, 10).restore(state, shardings, loader())
    want = np.load(expected)
    for i, leaf in enumerate(jax.tree.leaves(restored)):
        assert np.array_equal(np.asarray(leaf), want[str(i)]), i
    a = restored["params"]["model"]["layers"][0]["self_attn"]["q_proj"]["lora_a"]
    assert len(a.addressable_shards) == 8 and a.addressable_shards[0].data.shape[0] == a.shape[0] // 8
    save_run(Path(run_dir) / "eight", model, state, [5])
    np.savez(expected, **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})


def test_restores_onto_another_device_count_both_ways(tmp_path):
    model, mesh = lora_model(), make_mesh()
    state, shardings = train_state(model, mesh, seed=1)
    save_run(tmp_path / "one", model, state, [3])
    expected = tmp_path / "expected.npz"
    np.savez(expected, **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))})
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, __file__, str(tmp_path), str(expected)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    restored = TrainCheckpoints(config(tmp_path / "eight"), model, 10).restore(state, shardings, loader())
    want = np.load(expected)
    for i, leaf in enumerate(jax.tree.leaves(restored)):
        assert np.array_equal(np.asarray(leaf), want[str(i)])
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings


if __name__ == "__main__":
    _mesh_program(*sys.argv[1:])
