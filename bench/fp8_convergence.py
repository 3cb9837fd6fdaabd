"""FP8 against bf16 on real rows (issue 16): the `llama3.2-1b-hellaswag-fp8` preset (NeMo Automodel's
llama_3_2_1b_hellaswag_fp8: full SFT, Adam at a constant 1e-5, global batch 8, seq 256, 300 steps, lm_head kept in
bf16) run through the real CLI once per FP8 recipe and once in bf16, then the train losses compared step by step.

There is no Hub here, so the model is the Llama-3.2-1B shape with random weights (written once as an HF checkpoint,
the same weights for every run) and stories260K's tokenizer; the rows are HellaSwag's validation split (train and
validation both read it). One JSON line per FP8 recipe: the largest relative gap |fp8 - bf16| / bf16 over the logged
steps, where it is, and whether it stays within 2%.

    python bench/fp8_convergence.py --data ../shared/assets/data/hellaswag/validation.jsonl \
        --tokenizer ../shared/assets/models/stories260K --out /tmp/fp8_curves [--recipes tensorwise delayed]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from transformers import AutoTokenizer

from automodel_jax import AutoModelForCausalLM
from automodel_jax.training.metrics import loss_curves

from train_bench import ASSETS, SHAPES

REPO = Path(__file__).resolve().parents[1]
PRESET = f"{REPO / 'configs' / 'llama_sft.py'}:llama3.2-1b-hellaswag-fp8"


def write_model(directory: Path, shape: str, tokenizer: str) -> None:
    """A random-weight HF checkpoint of `shape` (float32, seed 0) with `tokenizer` beside it."""
    if (directory / "config.json").exists():
        return
    model = AutoModelForCausalLM.from_config(dict(model_type="llama", **SHAPES[shape]), dtype=jnp.float32)
    AutoModelForCausalLM.save_pretrained(model, directory)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory)


def train(out: Path, name: str, model: Path, data: str, *overrides: str) -> dict[int, float]:
    """One run of the preset through the CLI; its train losses by step."""
    run_dir = out / name
    argv = [sys.executable, "-m", "automodel_jax.finetune", "--config", PRESET, f"--config.run_dir={run_dir}",
            f"--config.model.path={model}", "--config.checkpoint.enabled=false", "--config.export.when=never",
            "--config.train.log_every=1", *(f"--config.data.{split}.path={data}" for split in ("train", "validation")),
            *overrides]
    print(" ".join(argv), flush=True)
    subprocess.run(argv, check=True)
    return loss_curves(run_dir / "metrics.jsonl")["train"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ASSETS / "data/hellaswag/validation.jsonl"))
    parser.add_argument("--tokenizer", default=str(ASSETS / "models/stories260K"))
    parser.add_argument("--out", required=True, help="directory for the model and the runs")
    parser.add_argument("--recipes", nargs="+", default=["tensorwise"], choices=("tensorwise", "delayed"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shape", default="llama3.2-1b", choices=sorted(SHAPES), help="tiny: a CPU smoke run")
    args = parser.parse_args()
    # This process only writes the model (on the CPU): it must not take the GPU memory the runs need.
    previous = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    emulate = f"--config.model.fp8.emulate={jax.default_backend() == 'cpu'}"  # starts the backends
    os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE")
    if previous is not None:
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = previous
    out = Path(args.out).absolute()
    model = out / f"{args.shape}-random"
    with jax.default_device(jax.devices("cpu")[0]):
        write_model(model, args.shape, args.tokenizer)
    steps = f"--config.train.max_steps={args.steps}"
    bf16 = train(out, "bf16", model, args.data, steps, "--config.model.fp8.enabled=false")
    for recipe in args.recipes:
        fp8 = train(out, f"fp8-{recipe}", model, args.data, steps, f"--config.model.fp8.recipe={recipe}", emulate)
        gaps = {s: abs(fp8[s] - bf16[s]) / bf16[s] for s in bf16}
        worst = max(gaps, key=gaps.get)
        print(json.dumps(dict(recipe=recipe, steps=sorted(bf16)[-1], logged_steps=len(gaps),
                              max_gap=round(gaps[worst], 5), at_step=worst, bf16_first=bf16[min(bf16)],
                              bf16_last=bf16[max(bf16)], fp8_last=fp8[max(fp8)], within_2_percent=gaps[worst] < 0.02)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
