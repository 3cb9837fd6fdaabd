"""Convert a Hugging Face checkpoint directory into an Orbax checkpoint of its parameters, sharded over a mesh.

    python converters/hf_to_orbax.py HF_DIR OUT_DIR [--mesh fsdp=4,tensor=2] [--param-dtype auto] [--overwrite]

The safetensors are streamed onto the mesh (no host copy of the whole model) and saved by Orbax, every device writing
its own shards; OUT_DIR then holds step 0 with the items params and meta (HF config, tensor dtypes, source path), which
converters/orbax_to_hf.py turns back into the same HF checkpoint, bit for bit.
"""
from __future__ import annotations

import argparse
import sys

import jax.numpy as jnp

from automodel_jax.checkpoint.hf import CheckpointTensors, refuse_non_empty, resolve_checkpoint_dir
from automodel_jax.checkpoint.orbax_io import save_params_checkpoint
from automodel_jax.cli import BAD_INPUT, exit_code
from automodel_jax import AutoModelForCausalLM
from automodel_jax.parallel.sharding import make_mesh


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2} (axes left out have size 1; one may be -1: the rest)."""
    try:
        return {axis.strip(): int(size) for axis, size in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mesh {text!r} is not AXIS=SIZE[,AXIS=SIZE...], e.g. fsdp=4,tensor=2")


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", type=parse_mesh, default=None,
                        help="mesh axis sizes over the devices, e.g. fsdp=4 or data=2,fsdp=-1 (default: one device)")


def source_dtype(directory) -> str:
    """The checkpoint's tensor dtype when all share one (exact round trip at no extra size), else float32."""
    tensors = CheckpointTensors(directory)
    dtypes = {f.entries[name][0] for name, f in tensors.where.items()}
    return jnp.dtype(dtypes.pop()).name if len(dtypes) == 1 else "float32"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="HF checkpoint directory (or Hub name) with config.json and safetensors")
    parser.add_argument("out_dir", help="Orbax checkpoint directory to write (must be empty unless --overwrite)")
    add_mesh_argument(parser)
    parser.add_argument("--param-dtype", default="auto",
                        help="dtype to store the parameters in; auto = the checkpoint's (float32 if it mixes dtypes)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    def run():
        refuse_non_empty(args.out_dir, args.overwrite, "choose another directory or pass --overwrite to replace it")
        directory = resolve_checkpoint_dir(args.hf_dir)
        dtype = source_dtype(directory) if args.param_dtype == "auto" else args.param_dtype
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, mesh=make_mesh(args.mesh))
        save_params_checkpoint(model, args.out_dir, model_path=str(directory), overwrite=args.overwrite)
        print(f"converted {directory} to {args.out_dir}", flush=True)
    return exit_code(run, BAD_INPUT + (TypeError,))  # TypeError: a --param-dtype that is not a dtype


if __name__ == "__main__":
    sys.exit(main())
