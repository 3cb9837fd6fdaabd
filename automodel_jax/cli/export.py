"""`python -m automodel_jax.export --checkpoint RUN_DIR[/STEP] --out DIR [--merge-lora] [--overwrite]`.

A LoRA run exports a PEFT adapter directory (for `peft.PeftModel.from_pretrained`), or with --merge-lora the base model
with the adapters folded in; a full fine-tuning run exports the whole model (sharded safetensors, index, config,
generation config, tokenizer files) for `transformers.AutoModelForCausalLM`.
"""
from __future__ import annotations

import argparse
import sys

from automodel_jax.checkpoint.export import export_checkpoint
from automodel_jax.cli import exit_code


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m automodel_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (its latest checkpoint), RUN_DIR/STEP or a checkpoint step directory")
    parser.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="LoRA: write the base model with the adapters merged instead of a PEFT adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file of a full model (5GB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def run():
        out = export_checkpoint(args.checkpoint, args.out, merge_lora=args.merge_lora, overwrite=args.overwrite,
                                max_shard_size=args.max_shard_size)
        print(f"exported {args.checkpoint} to {out}", flush=True)
    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
