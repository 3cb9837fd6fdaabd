"""Text -> (token ids, which tokens carry loss) -> one shifted sample.

Supervised text is given as character spans of one rendered string. The whole string is tokenized once and each
span boundary is placed at the longest common token prefix of the text before it and the whole text; so a token
that merges across a boundary (e.g. "Answer:" + " Denver" -> ":", " Denver") lands on the answer side and is
learned, instead of being mis-aligned by tokenizing the pieces separately.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from automodel_jax.data.sources import DataError
from automodel_jax.models.vocab import check_token_ids

IGNORE = -100


def token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Tokenize `text`; a token is supervised when it lies in one of the character `spans` (start, end)."""
    ids = token_ids(tokenizer, text)
    supervised = [False] * len(ids)
    for start, end in spans:
        first = _common_prefix_len(token_ids(tokenizer, text[:start]), ids)
        stop = len(ids) if end >= len(text) else _common_prefix_len(token_ids(tokenizer, text[:end]), ids)
        supervised[first:stop] = [True] * (stop - first)
    return ids, supervised


def bos_ids(tokenizer) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token, needed to end each answer")
    return tokenizer.eos_token_id


def encode_prompt_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[bool]]:
    """BOS + prompt + answer + EOS with loss on the answer and the EOS (NeMo Automodel's prompt-completion format)."""
    ids, supervised = encode_spans(tokenizer, prompt + answer, [(len(prompt), len(prompt) + len(answer))])
    bos = bos_ids(tokenizer)
    return bos + ids + [eos_id(tokenizer)], [False] * len(bos) + supervised + [True]


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids a run feeds whatever the text: the tokenizer's BOS, EOS, pad and unk tokens, named for messages
    ({"the tokenizer's pad token '<pad>'": 512, ...})."""
    named = {}
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            named[f"the tokenizer's {role} token {getattr(tokenizer, f'{role}_token')!r}"] = token_id
    return named


def check_vocabulary(tokenizer, vocab_size: int, *, pad_id: int | None = None, datasets: Sequence = (),
                     exempt: Sequence[int] = ()) -> None:
    """Start-up check that every token id a run will feed lies in the model's embedding table [0, vocab_size): the
    tokenizer's BOS/EOS/pad/unk tokens, the padding id, and every id of the `datasets` (TokenizedDataset or
    VLMDataset: .name, .samples with int input_ids and labels), which holds any added or chat-template token the data
    uses.
    `exempt`: ids the model replaces before embedding them (models.vocab.substituted_token_ids).

    Raises DataError naming the token, its id and vocab_size (an id outside the table embeds as NaN, see
    models/vocab.py).
    """
    try:
        check_token_ids(special_token_ids(tokenizer), vocab_size,
                        f"the tokenizer ({len(tokenizer)} tokens) does not fit this model: use the model's own "
                        f"tokenizer, or one whose special tokens have ids below {vocab_size}", exempt)
        if pad_id is not None:
            check_token_ids({"the padding id (data.pad_token_id)": pad_id}, vocab_size,
                            f"set data.pad_token_id to an id below {vocab_size}", exempt)
        for dataset in datasets:
            fed = [np.asarray(s[key]).ravel() for s in dataset.samples for key in ("input_ids", "labels")]
            ids = np.concatenate(fed or [np.zeros(0, int)])
            ids = ids[(ids != IGNORE) & ~np.isin(ids, list(exempt))]
            if len(ids):
                top = int(ids.max())
                token = tokenizer.convert_ids_to_tokens(top)
                check_token_ids({f"dataset {dataset.name}" + (f" (token {token!r})" if token else ""): top},
                                vocab_size, "build its rows with the model's own tokenizer (and for mock data a "
                                "vocab_size up to the model's)", exempt)
    except ValueError as e:
        raise DataError(str(e)) from None


def shift(ids: list[int], supervised: list[bool]) -> dict[str, np.ndarray]:
    """Full sequence -> sample: input_ids = ids[:-1], labels[t] = ids[t+1] where that token is supervised, else -100."""
    ids_arr = np.asarray(ids, dtype=np.int32)
    labels = np.where(np.asarray(supervised[1:], dtype=bool), ids_arr[1:], IGNORE).astype(np.int32)
    return {"input_ids": ids_arr[:-1], "labels": labels}


def _text_of(content, where: str) -> str:
    """Message content as one string: plain strings, or a list of {"type": "text", "text" | "value": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise DataError(f"{where}: only text content parts are supported, got {part!r}")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise DataError(f"{where}: text part without a 'text' or 'value' string: {part!r}")
            texts.append(text)
        return "".join(texts)
    raise DataError(f"{where}: message content must be a string or a list of text parts, got {type(content).__name__}")


def normalize_messages(messages, where: str) -> list[dict]:
    """OpenAI-style [{role, content: str}], whatever text-part layout the file used."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages, got {messages!r:.80}")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} needs 'role' and 'content', got {message!r:.80}")
        normalized.append({**message, "content": _text_of(message["content"], f"{where} message {i}")})
    return normalized


def encode_chat(tokenizer, messages: list[dict], template: str) -> tuple[list[int], list[bool]]:
    """Render with the chat template; loss on each assistant turn's text (see `assistant_spans`)."""
    return encode_spans(tokenizer, *assistant_spans(tokenizer, messages, template))


def assistant_spans(tokenizer, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end) character span of each assistant turn]): the loss goes on each assistant
    turn's text (the template's own tokens after its header). Raises DataError for a template that is not
    prefix-stable.

    An assistant turn spans from the end of the prefix rendered with the generation prompt (so the "assistant:"
    header stays unsupervised) to the end of the prefix that includes the turn. Templates that rewrite earlier turns
    depending on later ones break this; they are rejected rather than mislabelled.
    """
    def render(msgs, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise DataError("the chat template does not render a conversation's prefixes as prefixes of the whole "
                            "conversation, so assistant turns cannot be located; use a prefix-stable template")
        spans.append((len(before), len(through)))
    return text, spans
