"""Every mesh trains exactly like one device, with the parameter layout the rule table asks for.

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

from .mesh_program import MESHES, normal_spec

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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mesh", list(MESHES))
def test_three_steps_match_one_device(runs, method, mesh):
    record, out = runs
    one, sharded = record[f"{method}/one"], record[f"{method}/{mesh}"]
    np.testing.assert_allclose(sharded["losses"], one["losses"], rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(sharded["grad_norms"], one["grad_norms"], rtol=TOLERANCE, atol=TOLERANCE)
    assert one["losses"][0] != one["losses"][2]  # training moved: the parameter comparison below means something
    reference, params = np.load(out / f"{method}_one.npz"), np.load(out / f"{method}_{mesh}.npz")
    assert sorted(params.files) == sorted(reference.files) and len(reference.files) > 0
    for name in reference.files:
        np.testing.assert_allclose(params[name], reference[name], rtol=TOLERANCE, atol=TOLERANCE, err_msg=name)


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
