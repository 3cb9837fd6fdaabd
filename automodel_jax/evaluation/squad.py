"""SQuAD v1.1 exact match and F1 of greedy answers, scored with the official v1.1 normalisation.

The prompt is NeMo Automodel's fine-tuning prompt, "Context: {context} Question: {question} Answer: ", so a model
fine-tuned with the squad recipe is asked exactly what it learned to answer. The trailing space is not tokenized on
its own: in training it merges into the answer's first token, so the prompt is tokenized without it.
"""
from __future__ import annotations

import collections
import re
import string

import numpy as np

from automodel_jax.generation import context_length, generate

PROMPT = "Context: {context} Question: {question} Answer: "
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop articles, collapse whitespace (the official v1.1 evaluation script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: list[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: list[str]) -> float:
    return max(_f1(prediction, g) for g in golds)


def _golds(row: dict, where: str) -> list[str]:
    missing = [k for k in ("context", "question", "answers") if k not in row]
    if missing:
        raise ValueError(f"{where} lacks {missing}: SQuAD rows need context, question and answers "
                         "(the rajpurkar/squad schema)")
    golds = list(row["answers"]["text"])
    if not golds:
        raise ValueError(f"{where} has no gold answer; SQuAD v1.1 evaluation needs at least one (v2 is not supported)")
    return golds


def prompt_ids(tokenizer, row: dict, limit: int) -> list[int]:
    """BOS + prompt tokens, keeping BOS and the last tokens (the question) when longer than `limit`."""
    ids = list(tokenizer(PROMPT.format(context=row["context"], question=row["question"]).rstrip())["input_ids"])
    if len(ids) <= limit:
        return ids
    bos = tokenizer.bos_token_id
    keep_bos = bos is not None and ids[0] == bos
    return ([bos] if keep_bos else []) + ids[len(ids) - limit + keep_bos:]


def predict(model, tokenizer, rows, *, batch_size: int = 8, max_new_tokens: int = 32) -> list[str]:
    """Greedy answers, cut at the first line break (an answer is a span, one line)."""
    limit = context_length(model) - max_new_tokens
    if limit < 2:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{context_length(model)}-token context")
    prompts = [prompt_ids(tokenizer, row, limit) for row in rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outputs = generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens)
        for i, tokens in zip(chunk, outputs):
            answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip().split("\n")[0].strip()
    return answers


def score(model, tokenizer, rows, *, batch_size: int = 8, max_new_tokens: int = 32) -> list[dict]:
    """Per row: the predicted answer, its gold answers, and its exact match and F1 (each 0..1)."""
    golds = [_golds(row, f"squad row {i}") for i, row in enumerate(rows)]
    answers = predict(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return [{"prediction": a, "golds": g, "exact_match": exact_match(a, g), "f1": f1(a, g)}
            for a, g in zip(answers, golds)]


def metrics(scored: list[dict]) -> dict:
    """Means over questions, as fractions in [0, 1] (the official script prints them times 100)."""
    return {"exact_match": float(np.mean([s["exact_match"] for s in scored])),
            "f1": float(np.mean([s["f1"] for s in scored]))}
