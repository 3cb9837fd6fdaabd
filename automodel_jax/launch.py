"""`python -m automodel_jax.launch`: write and submit a multi-node Slurm job (the command lives in `automodel_jax.cli.launch`)."""
import sys

from automodel_jax.cli.launch import main

if __name__ == "__main__":
    sys.exit(main())
