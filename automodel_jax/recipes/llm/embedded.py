"""The embedded default: a small Llama, its tokenizer and tasks, all made by the project itself (no network).

`embedded:tiny-llama` is a character-level tokenizer plus a small Llama that the project pre-trains itself (full SFT
with this recipe, from a random init written in HF format by our own exporter) on two word skills: upper-case and
Caesar-shift a made-up word. `embedded:word-tasks/{train,validation}` is the fine-tuning task: new instruction words
("caps" = upper-case, "next" = shift) that the base model has never seen, so LoRA must learn to route them to skills
the base already has. Validation words never occur in any training split, so its loss and the generations on
held-out prompts measure what fine-tuning really learned.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import string
from pathlib import Path

from automodel_jax.config.cache import cache_dir as project_cache_dir

SCHEME = "embedded:"
MODEL_NAME = "tiny-llama"
def _shift(word: str) -> str:
    """Caesar shift by one letter (a -> b, z -> a)."""
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)


# The base model is pre-trained on these skills; fine-tuning teaches new instruction words that reuse them.
PRETRAIN_TASKS = {"upper": str.upper, "shift": _shift}
TASKS = {"caps": str.upper, "next": _shift}
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
TINY_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=128,
                  intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act="silu", initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  torch_dtype="float32")
SPLIT_SIZES = {"train": 4000, "validation": 256, "pretrain": 6000, "pretrain-validation": 256}
PRETRAIN = dict(steps=800, learning_rate=3e-3, warmup_steps=30, global_batch_size=32)
PRETRAIN_CHECKPOINT_EVERY = 100  # steps between the checkpoints an interrupted pre-training resumes from


def cache_dir() -> Path:
    """Where this recipe's embedded assets are built: embedded/ in the project's cache directory."""
    return project_cache_dir() / "embedded"


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
    if split.endswith("validation"):
        words = held_out
    else:
        words = _words(seed=0 if split == "train" else 2, count=SPLIT_SIZES[split], exclude=set(held_out))
    tasks = PRETRAIN_TASKS if split.startswith("pretrain") else TASKS
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
    blob = json.dumps([TINY_LLAMA, SPLIT_SIZES, sorted(TASKS), sorted(PRETRAIN_TASKS), PRETRAIN, PROMPT_TEMPLATE],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pretrain_config(cfg, init_dir: Path, run_dir: Path):
    """`cfg` (the recipe's default config) set for full-parameter SFT of the random init on the pre-training skills
    (float32 on the CPU)."""
    cfg.run_dir = str(run_dir)
    cfg.model.update(path=str(init_dir), dtype="float32", param_dtype="float32")
    cfg.peft.method = "none"
    for split, name in (("train", "pretrain"), ("validation", "pretrain-validation")):
        cfg.data[split].update(kind="instruction", path=f"{SCHEME}word-tasks/{name}", prompt_template=PROMPT_TEMPLATE)
        cfg.data[split].columns = dict(instruction="instruction", answer="output")
    cfg.data.seq_len = 32
    import jax
    devices = jax.device_count()  # data-parallel over every local device: micro batch = global batch / devices
    if PRETRAIN["global_batch_size"] % devices:
        raise ValueError(f"the embedded base model is pre-trained with batch {PRETRAIN['global_batch_size']}, which "
                         f"{devices} devices do not divide; build it once on one device (JAX_PLATFORMS=cpu)")
    cfg.train.update(global_batch_size=PRETRAIN["global_batch_size"],
                     micro_batch_size=PRETRAIN["global_batch_size"] // devices,
                     max_steps=PRETRAIN["steps"], val_every=0, log_every=50)
    cfg.optim.update(name="adamw", learning_rate=PRETRAIN["learning_rate"], weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=PRETRAIN["warmup_steps"],
                              min_learning_rate=PRETRAIN["learning_rate"] / 10)
    cfg.mesh.update(data=-1, fsdp=1)
    cfg.checkpoint.update(every_steps=PRETRAIN_CHECKPOINT_EVERY, keep=1)  # an interrupted build resumes
    cfg.export.when = "never"
    cfg.logging.tensorboard = False
    return cfg


def _build_base_model(root: Path, target: Path, default_config, run) -> None:
    """Random init + tokenizer in HF format, pre-trained with the recipe (`default_config`, `run`), exported with
    our exporter."""
    import jax

    from automodel_jax.auto import AutoModelForCausalLM, save_pretrained
    from automodel_jax.training.trainer import pretrain_base
    if jax.process_count() > 1:
        raise ValueError("the embedded base model is built by a single process; run the command once without "
                         "multiple processes first (it is cached), or set model.path to a real checkpoint")
    init_dir = root / "tiny-llama-init"
    save_pretrained(AutoModelForCausalLM.from_config(TINY_LLAMA, seed=0), init_dir, overwrite=True)
    build_tokenizer().save_pretrained(init_dir)
    print(f"building the embedded base model: pre-training {init_dir} on {sorted(PRETRAIN_TASKS)} "
          f"({PRETRAIN['steps']} steps, once; cached in {root})", flush=True)
    run_dir = root / "pretrain-run"
    model = pretrain_base(run, pretrain_config(default_config(), init_dir, run_dir), "embedded base model")
    written = target.with_name(target.name + ".partial")  # renamed once complete: a crash leaves no half model
    save_pretrained(model, written, overwrite=True)
    shutil.rmtree(target, ignore_errors=True)  # what an older, interrupted build may have left
    os.replace(written, target)
    shutil.rmtree(init_dir)
    shutil.rmtree(run_dir)


def materialize(name: str, default_config, run) -> str:
    """Local path for an `embedded:` name, building it on first use (under a file lock, written under another name
    and renamed when complete, so runs started together build it once and a crash leaves no half model); the
    base model is pre-trained by the recipe whose `default_config` and `run` are given (the recipe passes its own,
    so this module never imports it)."""
    what = name[len(SCHEME):]
    root = cache_dir() / _fingerprint()
    if what == MODEL_NAME:
        target = root / MODEL_NAME
        if not (target / "config.json").is_file():
            root.mkdir(parents=True, exist_ok=True)
            with open(root / ".build.lock", "w") as lock:  # runs started together: one builds, the others wait
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"waiting for another process to finish building the embedded base model in {root}",
                          flush=True)
                    fcntl.flock(lock, fcntl.LOCK_EX)
                if not (target / "config.json").is_file():
                    _build_base_model(root, target, default_config, run)
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
    known = [f"{SCHEME}{MODEL_NAME}"] + [f"{SCHEME}word-tasks/{s}" for s in SPLIT_SIZES]
    raise ValueError(f"unknown embedded asset {name!r}; known: {', '.join(known)}")


def resolve(path: str, default_config, run) -> str:
    """`path` itself, or the local path of an `embedded:` name (see `materialize`)."""
    return materialize(path, default_config, run) if isinstance(path, str) and path.startswith(SCHEME) else path
