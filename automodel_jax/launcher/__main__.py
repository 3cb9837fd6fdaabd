"""`python -m automodel_jax.launcher`: join the cluster and print one topology line per process.

Run it under srun (or with the explicit env variables) to check that every node sees all of its devices and can
reach the coordinator before starting a long job. Exits 1 with one line on stderr when start-up fails.
"""

import argparse
import sys

from automodel_jax.launcher.distributed import DistributedInitError, describe_topology, initialize_distributed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m automodel_jax.launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-s", type=int, default=300, help="seconds to wait for the coordinator and peers")
    args = parser.parse_args()
    try:
        initialize_distributed(timeout_s=args.timeout_s)
    except (DistributedInitError, ValueError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    describe_topology()
    return 0


if __name__ == "__main__":
    sys.exit(main())
