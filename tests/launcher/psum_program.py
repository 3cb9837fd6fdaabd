"""Cross-process check run by the launcher tests: join the cluster, psum and all-gather a sharded array.

Run as `python -m tests.launcher.psum_program --config tests/launcher/psum_config.py --config.run_dir=DIR` in
every process; each writes DIR/rank<i>.json with what it saw, for the test to check against its own expectation.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from automodel_jax.launcher.distributed import describe_topology, initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    info = initialize_distributed(timeout_s=config.init_timeout_s)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    topology = describe_topology(mesh)
    length = jax.device_count() * config.rows_per_device
    values = np.arange(length, dtype=np.float32)
    sharding = NamedSharding(mesh, P("data"))
    array = jax.make_array_from_callback((length,), sharding, lambda index: values[index])

    # psum of per-device partial sums: each process holds only its own shards, so this needs cross-process traffic.
    total = jax.jit(
        jax.shard_map(lambda x: jax.lax.psum(jnp.sum(x, keepdims=True), "data"), mesh=mesh, in_specs=P("data"),
                      out_specs=P())
    )(array)
    # All-gather: a replicated output makes every process receive every shard.
    gathered = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P()))(array)

    result = {
        "process_index": info.process_index,
        "process_count": info.process_count,
        "source": info.source,
        "local_devices": info.local_device_count,
        "global_devices": info.global_device_count,
        "psum": float(np.asarray(total.addressable_data(0))[0]),
        "gathered": np.asarray(gathered.addressable_data(0)).tolist(),
        "topology": topology,
    }
    out = Path(config.run_dir) / f"rank{info.process_index}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    print(f"rank {info.process_index}/{info.process_count} psum {result['psum']}", flush=True)


if __name__ == "__main__":
    app.run(main)
