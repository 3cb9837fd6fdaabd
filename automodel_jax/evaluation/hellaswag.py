"""HellaSwag zero-shot, as lm-evaluation-harness's `hellaswag` task defines it.

Each row becomes a query ("<activity label>: <ctx_a> <Ctx_b>", with the WikiHow bracket artifacts removed) and four
endings; the continuation scored is " " + ending. `acc` picks the ending with the highest log-likelihood, `acc_norm`
the highest log-likelihood per character of the ending (lm-eval's `acc_norm`).
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from automodel_jax.evaluation.loglikelihood import score_requests

TARGET_DELIMITER = " "


def preprocess(text: str) -> str:
    """lm-eval's cleanup: " [title]" ends a sentence, other [bracketed] tags go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclasses.dataclass(frozen=True)
class Question:
    query: str
    choices: tuple[str, ...]
    gold: int


def question_of(row: dict, where: str = "hellaswag row") -> Question:
    missing = [k for k in ("activity_label", "ctx_a", "ctx_b", "endings", "label") if k not in row]
    if missing:
        raise ValueError(f"{where} lacks {missing}: HellaSwag rows need activity_label, ctx_a, ctx_b, endings, label "
                         "(the Rowan/hellaswag schema)")
    if str(row["label"]) not in {str(i) for i in range(len(row["endings"]))}:
        raise ValueError(f"{where} has no usable gold label ({row['label']!r}); the test split is unlabelled, "
                         "evaluate on validation")
    query = preprocess(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return Question(query, tuple(preprocess(e) for e in row["endings"]), int(row["label"]))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces move to the continuation; the whole text is tokenized once (with the
    tokenizer's own special tokens, e.g. BOS) and the continuation is what follows the context's tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return list(context_ids), list(whole[len(context_ids):])


@dataclasses.dataclass(frozen=True)
class Scored:
    """One question's per-ending log-likelihoods and ending lengths in characters (acc_norm's denominator)."""
    question: Question
    loglikelihoods: tuple[float, ...]

    @property
    def char_lengths(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.question.choices)

    @property
    def correct(self) -> bool:
        return int(np.argmax(self.loglikelihoods)) == self.question.gold

    @property
    def correct_norm(self) -> bool:
        return int(np.argmax(np.asarray(self.loglikelihoods) / np.asarray(self.char_lengths))) == self.question.gold


def score(model, tokenizer, rows, *, batch_size: int = 8) -> list[Scored]:
    questions = [question_of(row, f"hellaswag row {i}") for i, row in enumerate(rows)]
    requests = [encode_pair(tokenizer, q.query, TARGET_DELIMITER + c) for q in questions for c in q.choices]
    loglik, _ = score_requests(model, requests, batch_size=batch_size)
    out, at = [], 0
    for q in questions:
        out.append(Scored(q, tuple(float(x) for x in loglik[at:at + len(q.choices)])))
        at += len(q.choices)
    return out


def metrics(scored: list[Scored]) -> dict:
    return {"acc": float(np.mean([s.correct for s in scored])),
            "acc_norm": float(np.mean([s.correct_norm for s in scored]))}
