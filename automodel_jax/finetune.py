"""`python -m automodel_jax.finetune`: fine-tune a model, LoRA or full SFT (the command lives in `automodel_jax.cli.finetune`)."""
import sys

from automodel_jax.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
