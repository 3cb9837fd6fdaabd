"""converters/: HF -> Orbax (sharded over a 4-device CPU mesh in a subprocess) -> HF is bit-identical, tensor by
tensor, for the real stories260K checkpoint and for a sharded bfloat16 one; --help and bad input."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from automodel_jax.checkpoint.hf import CheckpointTensors
from reference import REPO, STORIES


def converter(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "converters" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_checkpoint(original: Path, converted: Path) -> None:
    """Every tensor with the same name, dtype, shape and bytes; the same config."""
    want, got = CheckpointTensors(original), CheckpointTensors(converted)
    assert sorted(want.names()) == sorted(got.names())
    for name in want.names():
        a, b = want.get(name)[0], got.get(name)[0]
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and a.tobytes() == b.tobytes(), name
    assert json.loads((converted / "config.json").read_text()) == json.loads((original / "config.json").read_text())


@pytest.mark.assets
def test_stories260k_round_trip_through_a_4_device_mesh_is_bit_identical(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, str(REPO / "converters" / "hf_to_orbax.py"), str(STORIES),
                           str(tmp_path / "orbax"), "--mesh", "fsdp=4"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manager = ocp.CheckpointManager(tmp_path / "orbax", item_handlers={"params": ocp.StandardCheckpointHandler()})
    metadata = manager.item_metadata(0)["params"]
    gate = metadata["model"]["layers"]["0"]["mlp"]["gate_proj"]["kernel"]
    assert list(gate.sharding.shape) == [1, 4, 1, 1] and gate.sharding.partition_spec[0] == "fsdp"

    assert converter("orbax_to_hf").main([str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    assert_same_checkpoint(STORIES, tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer.model", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (STORIES / name).read_bytes()


def test_sharded_bfloat16_checkpoint_round_trips_bit_identically(hf_llama_factory, tmp_path):
    import torch
    model, _ = hf_llama_factory()
    source = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(source, max_shard_size="40KB")
    assert len(list(source.glob("model-*.safetensors"))) > 1
    assert converter("hf_to_orbax").main([str(source), str(tmp_path / "orbax")]) == 0
    assert converter("orbax_to_hf").main([str(tmp_path / "orbax"), str(tmp_path / "hf"), "--max-shard-size",
                                          "40KB"]) == 0
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert_same_checkpoint(source, tmp_path / "hf")


@pytest.mark.assets
@pytest.mark.parametrize("name, missing_source", [("hf_to_orbax", "is not a checkpoint directory"),
                                                  ("orbax_to_hf", "does not exist; pass a run directory")])
def test_help_and_bad_input(name, missing_source, tmp_path, capsys):
    module = converter(name)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "--mesh" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main([str(tmp_path), str(tmp_path / "out"), "--mesh", "fsdp4"])
    assert "is not AXIS=SIZE" in capsys.readouterr().err
    assert module.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert missing_source in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert module.main([str(STORIES), str(tmp_path / "out")]) == 2
    assert "is not empty; choose another directory or pass --overwrite" in capsys.readouterr().err
