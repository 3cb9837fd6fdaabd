"""`python -m automodel_jax.plan`: print the run plan of a fine-tuning config (the command lives in `automodel_jax.cli.plan`)."""
import sys

from automodel_jax.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
