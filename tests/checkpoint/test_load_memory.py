"""The HF loader streams: while it loads a checkpoint the host holds about one in-flight budget of its tensors beyond
the loaded model, never the whole file. Measured in a fresh process (its resident set sampled every millisecond) on
a second load, when every program is compiled, with the budget set below the largest tensor: whole-file loading
would show the file's size on top of the model (on a CPU the model itself is host memory, so it is subtracted; on a
GPU the host holds none of it). A large tensor travels in row pieces, which join into exactly the tensor."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from reference import REPO

PROBE = r"""
import json, sys, threading, time
import jax
from flax import nnx
from automodel_jax.checkpoint import hf

def resident():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

hf.HOST_BYTES_IN_FLIGHT = 1 << 20
first = hf.load_pretrained(sys.argv[1])  # compiles every program the second load runs
before, peak, done = resident(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], resident())
        time.sleep(0.001)

sampler = threading.Thread(target=sample)
sampler.start()
second = hf.load_pretrained(sys.argv[1])
done.set()
sampler.join()
model_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(second)))
print(json.dumps(dict(growth=peak[0] - before, model_bytes=model_bytes, platform=jax.default_backend())))
"""


@pytest.mark.parametrize("platform", ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="needs a CUDA GPU: the host memory of a load onto it")])])
def test_loading_holds_about_one_tensor_beyond_the_model_not_the_whole_file(hf_llama_factory, platform):
    _, directory = hf_llama_factory(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=2, vocab_size=8192)
    [file] = directory.glob("*.safetensors")
    file_bytes = file.stat().st_size  # float32: about 256 MB, largest tensor 32 MB
    # (on a GPU the test process holds most of its memory: the probe takes only what it needs)
    env = dict(os.environ, JAX_PLATFORMS={"gpu": "cuda"}.get(platform, platform), PYTHONPATH=str(REPO),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    done = subprocess.run([sys.executable, "-c", PROBE, str(directory)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["platform"] == platform and measured["model_bytes"] > 0.9 * file_bytes
    beyond_model = measured["growth"] - (measured["model_bytes"] if platform == "cpu" else 0)
    # about one 32 MB tensor's pages and its transfer copy; loading the whole file would add 256 MB
    assert beyond_model < 0.4 * file_bytes, (beyond_model, file_bytes)


PIECES = r"""
import json, sys
import jax, numpy as np
from automodel_jax.checkpoint import hf
from automodel_jax.models.params import flatten, pure_dict
from automodel_jax.parallel.sharding import make_mesh

whole = flatten(pure_dict(hf.load_pretrained(sys.argv[1])))  # every tensor in one transfer
hf.PIECE_BYTES, hf.HOST_BYTES_IN_FLIGHT = 1000, 3000  # rows of 48 float32: pieces of 5 rows, 3 in flight
pieced = {}
for shape in (None, {"fsdp": 2, "tensor": 2}):
    mesh = make_mesh(shape)
    counts = []
    row_pieces = hf.row_pieces
    hf.row_pieces = lambda *a: counts.append(len(row_pieces(*a))) or row_pieces(*a)
    model = hf.load_pretrained(sys.argv[1], mesh=mesh)
    hf.row_pieces = row_pieces
    same = all(np.array_equal(np.asarray(x), np.asarray(whole[path]))
               for path, x in flatten(pure_dict(model)).items())
    pieced[str(shape)] = dict(same=same, most_pieces=max(counts), whole_tensors=counts.count(1), tensors=len(counts))
print(json.dumps(pieced))
"""


def test_tensors_transferred_in_row_pieces_load_bit_identically_on_any_mesh(hf_llama_factory):
    """The pieces of a tensor join on the devices into exactly the tensor: on one device and on an fsdp x tensor mesh
    (where a tensor whose rows the devices split goes whole), with transposed kernels and a short last piece."""
    _, directory = hf_llama_factory()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", PIECES, str(directory)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, mesh = json.loads(done.stdout.splitlines()[-1]).values()
    assert one["same"] and mesh["same"], (one, mesh)
    assert mesh["most_pieces"] > 1  # the other tensors still go in pieces, split over the mesh along their columns
    assert one["most_pieces"] == 21 and one["whole_tensors"] < one["tensors"]  # 101 vocabulary rows: 20 x 5 + 1
    assert mesh["whole_tensors"] > one["whole_tensors"]  # rows split over the mesh: whole
