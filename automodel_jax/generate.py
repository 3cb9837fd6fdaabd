"""`python -m automodel_jax.generate`: stream a model's continuation of prompts (the command lives in `automodel_jax.cli.generate`)."""
import sys

from automodel_jax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
