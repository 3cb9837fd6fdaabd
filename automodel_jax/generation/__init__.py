"""Text generation with a KV cache: one jitted prefill over the left-padded prompts, then one jitted step per token.

Prompts are left padded to a bucketed width, so every row's last prompt token sits in the same column and all rows
decode in lock step. Positions count each row's real tokens (HF generate's convention) and the cache's segment ids
(the attention mask) keep padding out of attention. The model is split once and the step is a pure function of
(graphdef, state, cache, ...), so XLA compiles two programs per (batch size, prompt bucket, max new tokens).
Generation with images (a VLM's prefill runs its vision tower) is `generation.vlm.generate_with_images`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from automodel_jax.models.vocab import check_token_ids

logger = logging.getLogger(__name__)


class GenerationError(ValueError):
    """The model produced non-finite logits: generation stops instead of printing tokens picked from NaN."""


def bucket_length(n: int) -> int:
    """Pad lengths to few shapes: powers of two up to 64, then multiples of 64 (one compile per bucket)."""
    if n <= 64:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 64) * 64


def context_length(model) -> int:
    """The longest sequence the model was trained for (HF's max_position_embeddings)."""
    return model.config.rope.max_position_embeddings


def enforced_context(model) -> int | None:
    """The context that sequences are held to: max_position_embeddings, or None for a model with "dynamic" rope
    scaling (NTK, defined for any length as in HF)."""
    return None if model.config.rope.type == "dynamic" else context_length(model)


def check_context(model, positions: int, what: str, setting: str, others: int = 0) -> None:
    """ValueError when `what` needs more `positions` than the model's context (max_position_embeddings): telling to
    set `setting` to at most the context less `others` (positions the rest takes). A model with "dynamic" rope
    scaling (NTK, defined for any length as in HF) is let past its context, with a log line saying so."""
    limit = context_length(model)
    if positions <= limit:
        return
    rope = model.config.rope
    if enforced_context(model) is None:
        logger.info("%s needs %d positions, beyond max_position_embeddings %d: the model's dynamic rope scaling "
                    "(factor %g) stretches its rotary embedding to that length, as in HF", what, positions, limit,
                    rope.factor)
        return
    room = limit - others
    fix = f"set {setting} to at most {room}" if room > 0 else f"the rest already takes {others} positions"
    raise ValueError(f"{what} needs {positions} positions, more than the model's context of {limit} "
                     f"(max_position_embeddings in its config.json); {fix}")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked: argmax at temperature 0; else temperature, top-k, top-p (HF's order), sample."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k {self.top_k} must be >= 0 (0 = no top-k filter)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p} must be in (0, 1] (1 = no nucleus filter)")


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature-scaled float32 logits [B, V] with the tokens top-k and top-p exclude set to -inf."""
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # Keep the most likely tokens until their mass reaches top_p (always at least one).
        ordered = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        kept = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < sampling.top_p, axis=-1, keepdims=True)
        logits = jnp.where(logits < jnp.take_along_axis(ordered, kept - 1, axis=-1), -jnp.inf, logits)
    return logits


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token id [B] from float32 logits [B, V]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def _step(graphdef, state, cache, tokens, positions, segment_ids, key, step, extras, *, sampling):
    """Run `tokens` [B, T] through the model, appending them to the cache; pick the token after the last one.
    `extras`: more keyword arguments of the model's call (a VLM prefill's images), {} otherwise. Returns (picked
    tokens [B], whether each row's logits were all finite [B], the cache)."""
    logits, cache = nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids, cache=cache,
                                               **extras)
    last = logits[:, -1].astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(last), axis=-1)
    return sample_tokens(last, jax.random.fold_in(key, step), sampling), finite, cache


def _encode(tokenizer, prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings or of token id lists")
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is text but no tokenizer was given; pass a tokenizer or token ids")
            prompt = tokenizer(prompt)["input_ids"]
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} has no tokens; give at least one (e.g. the BOS token)")
        outside = [t for t in ids if not 0 <= t < vocab_size]
        check_token_ids({f"prompt {i}": outside[0]} if outside else {}, vocab_size,
                        "encode it with the model's own tokenizer")
        encoded.append(ids)
    return encoded


def default_eos_ids(model, tokenizer) -> tuple[int, ...]:
    """The checkpoint's generation_config.json eos_token_id (an id or a list, as HF reads it), else the tokenizer's."""
    directory = model.hf_source.directory
    config = Path(directory) / "generation_config.json" if directory else None
    if config is not None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return (tokenizer.eos_token_id,)
    return ()


def generate(model, tokenizer, prompts: list[list[int]] | list[str], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None, seed: int = 0,
             stream: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """New tokens for each prompt (text is tokenized with `tokenizer`, BOS included as the tokenizer adds it).

    A row stops after its first EOS (kept in its output) or after `max_new_tokens`; finished rows are fed padding
    until every row is done. `stream(row, token)` is called with each new token as soon as it exists. LoRA adapters
    inside the model's Linear layers are simply run (never merged). Raises ValueError for token ids outside the
    embedding table or more positions than the model's context, GenerationError for non-finite logits.
    """
    sampling = Sampling(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
    prompts = _encode(tokenizer, prompts, model.config.vocab_size)
    eos, pad_token_id = special_ids(model, tokenizer, eos_token_id, pad_token_id)
    batch, width = len(prompts), bucket_length(max(map(len, prompts)))
    tokens = np.full((batch, width), pad_token_id, np.int32)
    mask = np.zeros((batch, width), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids):], mask[row, width - len(ids):] = ids, 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return decode(model, tokens, positions, mask, positions[:, -1] + 1, {}, max_new_tokens=max_new_tokens,
                  sampling=sampling, eos=eos, pad_token_id=pad_token_id, seed=seed, stream=stream)


def special_ids(model, tokenizer, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id): the given ones, else the checkpoint's / tokenizer's (pad falls back to EOS, then 0).
    ValueError when the pad id, which fills the prompts' padding, lies outside the model's embedding table."""
    if eos_token_id is None:
        eos = default_eos_ids(model, tokenizer)
    else:
        eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer is not None else None
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    check_token_ids({"the padding token": pad_token_id}, model.config.vocab_size,
                    "give a pad_token_id inside the vocabulary (e.g. the EOS id)")
    return eos, pad_token_id


def decode(model, tokens: np.ndarray, positions: np.ndarray, mask: np.ndarray, next_position: np.ndarray,
           extras: dict, *, max_new_tokens: int, sampling: Sampling, eos: tuple[int, ...], pad_token_id: int,
           seed: int = 0, stream: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """The KV-cache loop over left-padded prompts: tokens, mask [B, W] int32, positions [B, W] (or M-RoPE [3, B, W]),
    next_position [B] (each row's first new position); `extras` go to the prefill call only. New tokens per row."""
    batch, width = tokens.shape
    longest = int(np.max(next_position))
    check_context(model, longest + max_new_tokens, f"a prompt of {longest} positions + max_new_tokens "
                  f"{max_new_tokens}", "max_new_tokens", others=longest)
    graphdef, state = nnx.split(model)
    # Own buffer per leaf: the step donates the cache, and a buffer shared by two leaves cannot be donated twice.
    cache = jax.tree.map(jnp.copy, model.init_cache(batch, width + max_new_tokens))
    key = jax.random.key(seed)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        picked, finite, cache = _step(graphdef, state, cache, tokens, positions, mask, key, step,
                                      extras if step == 0 else {}, sampling=sampling)
        broken = np.flatnonzero(~np.asarray(finite) & ~finished)
        if len(broken):
            raise GenerationError(f"the model's logits for prompt {broken[0]} are not finite (NaN or inf) at new "
                                  f"token {step}, so no token can be picked; {nonfinite_cause(state)}")
        picked = np.where(finished, pad_token_id, np.asarray(picked)).astype(np.int32)
        for row in np.flatnonzero(~finished):
            token = int(picked[row])
            outputs[row].append(token)
            finished[row] = token in eos
            if stream is not None:
                stream(int(row), token)
        if finished.all():
            break
        tokens, positions = picked[:, None], (next_position + step)[:, None]
        mask = np.ones((batch, 1), np.int32)
    return outputs


def nonfinite_cause(state) -> str:
    """Why a model's logits are not finite, from its parameters (state): the first non-finite one by name, else the
    dtype it runs in."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    floats = [(path, leaf) for path, leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    # A path is the module's HF name, then the parameter (and nnx's `.value`): model.norm, scale.
    names = [[str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path] for path, _ in floats]
    names = [n[:-1] if n[-1] == "value" else n for n in names]
    bad = [(".".join(n[:-1]), n[-1]) for n, (_, leaf) in zip(names, floats) if not bool(jnp.isfinite(leaf).all())]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return (f"the {bad[0][1]} of module {bad[0][0]}{more} holds NaN or inf: the checkpoint is broken; export or "
                "train it again")
    dtype = floats[0][1].dtype if floats else None
    if dtype is not None and dtype != jnp.float32:
        return f"the parameters are finite, so {dtype} arithmetic overflowed: load the model in float32 (--dtype)"
    return "the parameters are finite even in float32: the inputs (prompt, images) drive the model out of range"
