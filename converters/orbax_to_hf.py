"""Convert an Orbax checkpoint (from converters/hf_to_orbax.py, or a run's checkpoint) into a Hugging Face checkpoint.

    python converters/orbax_to_hf.py ORBAX_DIR OUT_DIR [--mesh fsdp=4] [--max-shard-size 5GB] [--overwrite]

Writes sharded safetensors in the source checkpoint's dtypes, the index, config.json, the generation config and the
tokenizer files of the source directory when it still exists. A LoRA run's checkpoint is exported merged into its
base model (for a PEFT adapter use `python -m automodel_jax.export`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_to_orbax import add_mesh_argument  # noqa: E402 - the converters are scripts side by side

from automodel_jax.cli import exit_code  # noqa: E402
from automodel_jax.checkpoint.export import export_checkpoint  # noqa: E402
from automodel_jax.parallel.sharding import make_mesh  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("orbax_dir", help="Orbax checkpoint: a converted directory, a run directory or a step")
    parser.add_argument("out_dir", help="HF checkpoint directory to write (must be empty unless --overwrite)")
    add_mesh_argument(parser)
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run():
        export_checkpoint(args.orbax_dir, args.out_dir, merge_lora=True, overwrite=args.overwrite,
                          max_shard_size=args.max_shard_size, mesh=make_mesh(args.mesh))
        print(f"converted {args.orbax_dir} to {args.out_dir}", flush=True)
    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
