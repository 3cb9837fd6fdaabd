"""`python -m automodel_jax.export`: export a run for HF users (the command lives in `automodel_jax.cli.export`)."""
import sys

from automodel_jax.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
