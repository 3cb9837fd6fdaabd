"""`python -m automodel_jax.evaluate --model DIR --task hellaswag|squad`: score a checkpoint and print the metrics.

HellaSwag reports lm-evaluation-harness's `acc` and `acc_norm`; SQuAD the v1.1 exact match and F1 of greedy answers
(all as fractions). Rows come from `--data` (a json/jsonl/parquet/csv file or a saved dataset) or, by default, from
the Hub (Rowan/hellaswag or rajpurkar/squad, validation split).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from automodel_jax.cli import exit_code
from automodel_jax.config.cache import enable_compilation_cache
from automodel_jax.data.sources import DataError, load_rows
from automodel_jax.evaluation import DEFAULT_DATA, TASKS, evaluate
from automodel_jax.auto import load_for_inference


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m automodel_jax.evaluate", allow_abbrev=False, description=__doc__)
    parser.add_argument("--model", required=True, help="HF checkpoint directory (or run directory, or Hub name)")
    parser.add_argument("--adapter", help="HF PEFT LoRA adapter directory to apply")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--data", help="rows file or directory; default: the task's Hub dataset (validation)")
    parser.add_argument("--limit", type=int, help="score only the first N rows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length bound (squad)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--output", type=Path, help="also write the metrics to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)

    def run():
        enable_compilation_cache()
        hub_name, split = DEFAULT_DATA[args.task]
        try:
            rows = load_rows(args.data or hub_name, split, args.limit)
        except DataError as e:
            raise DataError(f"{e}; evaluate takes the rows with --data" if not args.data else str(e)) from None
        model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype)
        result = evaluate(model, tokenizer, args.task, rows, args.limit, args.batch_size,
                          max_new_tokens=args.max_new_tokens)
        text = json.dumps(result, indent=2)
        print(text)
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text + "\n")
    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
