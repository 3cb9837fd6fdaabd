"""`python -m automodel_jax.generate --model DIR --prompt TEXT [--image PATH ...]`: stream a model's continuation to
the terminal.

`--model` is an HF checkpoint directory (or a run directory holding one), `--adapter` an HF PEFT LoRA adapter to
run on top of it, `--chat` wraps each prompt in the tokenizer's chat template as a user turn. With `--image` (a
vision-language model: Gemma 3, Qwen2.5-VL) each prompt becomes a user turn holding every given image, then the text,
rendered by the model's processor and its chat template.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from automodel_jax.cli import exit_code
from automodel_jax.config.cache import enable_compilation_cache
from automodel_jax.auto import load_for_inference, load_vlm_for_inference
from automodel_jax.generation import generate
from automodel_jax.generation.vlm import chat_inputs, generate_with_images


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m automodel_jax.generate", allow_abbrev=False, description=__doc__)
    parser.add_argument("--model", required=True, help="HF checkpoint directory (or run directory, or Hub name)")
    parser.add_argument("--adapter", help="HF PEFT LoRA adapter directory to apply")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--image", action="append", default=[],
                        help="image file for a vision-language model (each prompt gets every image); repeat for "
                             "several; implies --chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--top-k", type=int, default=0, help="0 (default) disables the top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 (default) disables the nucleus filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    return parser


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """Prompt tokens: the tokenizer's own encoding (BOS included), or the chat template's rendering of a user turn."""
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {tokenizer.name_or_path} has no chat template; drop --chat to continue "
                         "plain text")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def read_image(path: str):
    """The image file at `path` as a PIL RGB image; FileNotFoundError / ValueError naming the file otherwise."""
    from PIL import Image
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"--image {path}: no such file; give the path of an image file (PNG, JPEG, ...)")
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for non-image or truncated files
        raise ValueError(f"--image {path} is not a readable image ({type(e).__name__}); give a PNG, JPEG or other "
                         "image file") from None


class TerminalStream:
    """Prints new text as tokens arrive: decodes prompt + new tokens and writes what was not yet written, holding
    back while the text ends in an incomplete UTF-8 sequence (decoded as U+FFFD)."""

    def __init__(self, tokenizer, prompt: list[int], out):
        self.tokenizer, self.tokens, self.out = tokenizer, list(prompt), out
        self.written = len(self._text())

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self._text()
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)

    def run():
        enable_compilation_cache()
        empty = [i for i, p in enumerate(args.prompt) if not p.strip()]
        if empty:
            raise ValueError(f"--prompt number {empty[0] + 1} is empty; give some text to continue")
        if args.image:
            return run_with_images()
        model, tokenizer = load_for_inference(args.model, args.adapter, dtype=args.dtype)
        prompts = [prompt_ids(tokenizer, p, args.chat) for p in args.prompt]
        for text, ids in zip(args.prompt, prompts):
            sys.stdout.write(text if not args.chat else f"[user] {text}\n[assistant] ")
            generate(model, tokenizer, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                     stream=TerminalStream(tokenizer, [] if args.chat else ids, sys.stdout))
            sys.stdout.write("\n")

    def run_with_images():
        images = [read_image(p) for p in args.image]  # bad files fail before the model loads
        model, processor = load_vlm_for_inference(args.model, args.adapter, dtype=args.dtype)
        tokenizer = processor.tokenizer
        for text in args.prompt:
            sys.stdout.write(f"[user] {text}\n[assistant] ")
            generate_with_images(model, tokenizer, chat_inputs(processor, text, images),
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed, stream=TerminalStream(tokenizer, [], sys.stdout))
            sys.stdout.write("\n")
    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
