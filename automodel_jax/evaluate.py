"""`python -m automodel_jax.evaluate`: score a model on HellaSwag or SQuAD (the command lives in `automodel_jax.cli.evaluate`)."""
import sys

from automodel_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
