"""Every mesh trains exactly like one device, with the parameter layout the rule table asks for; so do fsdp and
fsdp x tensor with the default chunked loss and with packed rows.

The runs happen in mesh_program.py, in a subprocess with 8 simulated CPU devices (this process may already have
initialised jax with one device); this file compares what it wrote.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .mesh_program import MESHES, VARIANT_MESHES, VARIANTS, normal_spec

REPO = Path(__file__).resolve().parents[2]
METHODS = ("lora", "sft")
TOLERANCE = 1e-5
FT = ("fsdp", "data")  # the zero3 rule: embed over fsdp, then data
# What the rules must give (written out by hand, not computed from the rule table): param -> spec per mesh.
EXPECTED_SPECS = {
    "data8": dict(q_proj=(None, None), o_proj=(None, None), embedding=(None, None), lm_head=(None, None),
                  q_lora_a=(None, None), q_lora_b=(None, None)),
    "fsdp8": dict(q_proj=("fsdp", None), o_proj=(None, "fsdp"), embedding=(None, "fsdp"), lm_head=("fsdp", None),
                  q_lora_a=("fsdp", None), q_lora_b=(None, None)),
    "fsdp2_tensor4": dict(q_proj=("fsdp", "tensor"), o_proj=("tensor", "fsdp"), embedding=("tensor", "fsdp"),
                          lm_head=("fsdp", "tensor"), q_lora_a=("fsdp", None), q_lora_b=(None, "tensor")),
    "data2_fsdp2_context2": dict(q_proj=("fsdp", None), o_proj=(None, "fsdp"), embedding=(None, "fsdp"),
                                 lm_head=("fsdp", None), q_lora_a=("fsdp", None), q_lora_b=(None, None)),
    "tensor2_context4": dict(q_proj=(None, "tensor"), o_proj=("tensor", None), embedding=("tensor", None),
                             lm_head=(None, "tensor"), q_lora_a=(None, None), q_lora_b=(None, "tensor")),
    "zero3_data4_fsdp2": dict(q_proj=(FT, None), o_proj=(None, FT), embedding=(None, FT), lm_head=(FT, None),
                              q_lora_a=(FT, None), q_lora_b=(None, None)),
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(record.json, out dir) of one mesh_program run."""
    out = tmp_path_factory.mktemp("mesh_runs")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, "-m", "tests.parallel.mesh_program", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "record.json").read_text()), out


def test_program_saw_eight_devices(runs):
    assert runs[0]["devices"] == 8


def assert_same_training(runs, one: str, sharded: str):
    """Runs `one` and `sharded` (record keys; their npz files replace "/" by "_") have the same losses, gradient
    norms and final trainable parameters, and training moved."""
    record, out = runs
    np.testing.assert_allclose(record[sharded]["losses"], record[one]["losses"], rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(record[sharded]["grad_norms"], record[one]["grad_norms"], rtol=TOLERANCE,
                               atol=TOLERANCE)
    assert record[one]["losses"][0] != record[one]["losses"][2]  # training moved: the parameter comparison matters
    reference, params = (np.load(out / f"{key.replace('/', '_')}.npz") for key in (one, sharded))
    assert sorted(params.files) == sorted(reference.files) and len(reference.files) > 0
    for name in reference.files:
        np.testing.assert_allclose(params[name], reference[name], rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_three_steps_match_one_device(runs, method, mesh):
    assert_same_training(runs, f"{method}/one", f"{method}/{mesh}")


@pytest.mark.parametrize("variant, method", [(variant, method) for variant, spec in VARIANTS.items()
                                             for method in spec["methods"]])
@pytest.mark.parametrize("mesh", VARIANT_MESHES)
def test_default_loss_and_packed_rows_match_one_device(runs, variant, method, mesh):
    assert_same_training(runs, f"{method}/{variant}/one", f"{method}/{variant}/{mesh}")


def test_chunked_loss_trains_like_the_naive_one(runs):
    """The default loss is the naive one computed in chunks: same three steps on the same right-padded batches."""
    for method in METHODS:
        assert_same_training(runs, f"{method}/one", f"{method}/chunked/one")


def test_packed_batches_hold_several_samples_a_row(runs):
    assert min(runs[0]["packed_segments"]) >= 3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_parameter_and_optimizer_specs_follow_the_rules(runs, method, mesh):
    specs = runs[0][f"{method}/{mesh}"]["specs"]
    expected = {name: normal_spec(spec) for name, spec in EXPECTED_SPECS[mesh].items()
                if method == "lora" or not name.startswith("q_lora")}
    assert {name: specs[name] for name in expected} == expected
    moment_of = "q_lora_a" if method == "lora" else "q_proj"  # Adam's mu and nu are sharded like their parameter
    assert specs["mu"] == specs["nu"] == expected[moment_of]
    assert specs["count"] == "()"


def test_one_device_run_is_unsharded(runs):
    assert set(runs[0]["lora/one"]["specs"].values()) == {"()"}


def test_constrain_pins_activations_by_the_rules(runs):
    constrained = runs[0]["constrain"]
    # fsdp=2 x tensor=2 x context=2: batch over fsdp, seq over context, mlp over tensor.
    assert constrained["mlp"] == normal_spec(("fsdp", "context", "tensor"))
    # embed maps to fsdp too, which batch already took: replicated rather than sharded twice.
    assert constrained["embed"] == normal_spec(("fsdp", None, None))
    # Under context parallelism attention reads keys/values of every position: seq unsharded, heads over tensor.
    assert constrained["context_parallel"] is True
    assert constrained["gathered_kv"] == normal_spec(("fsdp", None, "tensor", None))
