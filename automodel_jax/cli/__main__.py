"""`python -m automodel_jax.cli COMMAND ...`: the same as the `automodel-jax` console script."""
import sys

from automodel_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
