"""The embedded default: a small Llama, its tokenizer and a task, all made by the project itself (no network).

`embedded:tiny-llama` names a character-level tokenizer and a small randomly initialised Llama written in HF format
with our own exporter; `embedded:word-tasks/{train,validation}` names a synthetic instruction set (reverse, upper-case
or sort a made-up word) written as jsonl. The words of the validation split never occur in training, so its loss and
the generations on held-out prompts measure what fine-tuning really learned.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import string
from pathlib import Path

SCHEME = "embedded:"
MODEL_NAME = "tiny-llama"
TASKS = {"reverse": lambda w: w[::-1], "upper": str.upper, "sort": lambda w: "".join(sorted(w))}
PRETRAIN_TASKS = {"copy": lambda w: w}
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
TINY_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=128,
                  intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act="silu", initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  torch_dtype="float32")
SPLIT_SIZES = {"train": 4000, "validation": 256, "pretrain": 4000}


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOMODEL_JAX_CACHE", Path.home() / ".cache" / "automodel_jax")) / "embedded"


def _words(seed: int, count: int, exclude: set[str] = frozenset()) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 7)))
        if word not in exclude and word not in out:
            out.append(word)
    return out


def task_rows(split: str) -> list[dict]:
    """{instruction, input, output} rows; validation words are disjoint from training words."""
    held_out = _words(seed=1, count=SPLIT_SIZES["validation"])
    words = held_out if split == "validation" else _words(seed=0 if split == "train" else 2,
                                                          count=SPLIT_SIZES[split], exclude=set(held_out))
    tasks = PRETRAIN_TASKS if split == "pretrain" else TASKS
    names = sorted(tasks)
    return [dict(instruction=f"{names[i % len(names)]} {w}", input="", output=tasks[names[i % len(names)]](w))
            for i, w in enumerate(words)]


PROMPT_TEMPLATE = "{instruction} = "


def build_tokenizer():
    """A character-level fast tokenizer over printable ASCII, saved and reloaded like any HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def _fingerprint() -> str:
    blob = json.dumps([TINY_LLAMA, SPLIT_SIZES, sorted(TASKS), PROMPT_TEMPLATE], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def materialize(name: str) -> str:
    """Local path for an `embedded:` name, building it on first use (atomically, so parallel runs are safe)."""
    what = name[len(SCHEME):]
    root = cache_dir() / _fingerprint()
    if what == MODEL_NAME:
        target = root / MODEL_NAME
        if not (target / "config.json").is_file():
            from automodel_jax import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_config(TINY_LLAMA, seed=0)
            model.save_pretrained(target, overwrite=True)
            tmp = root / f".tok-{os.getpid()}"
            build_tokenizer().save_pretrained(tmp)
            for f in tmp.iterdir():
                os.replace(f, target / f.name)
            tmp.rmdir()
        return str(target)
    if what.startswith("word-tasks/") and what.split("/", 1)[1] in SPLIT_SIZES:
        split = what.split("/", 1)[1]
        target = root / f"word-tasks-{split}.jsonl"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in task_rows(split)))
            os.replace(tmp, target)
        return str(target)
    raise ValueError(f"unknown embedded asset {name!r}; known: {SCHEME}{MODEL_NAME}, "
                     f"{SCHEME}word-tasks/train, {SCHEME}word-tasks/validation")


def resolve(path: str) -> str:
    return materialize(path) if isinstance(path, str) and path.startswith(SCHEME) else path
