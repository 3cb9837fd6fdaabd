"""HellaSwag scored as lm-evaluation-harness defines it, checked against a direct torch computation on stories260K."""
import json

import numpy as np
import pytest
import torch
import transformers

from automodel_jax import AutoModelForCausalLM
from automodel_jax.evaluation import evaluate, hellaswag
from automodel_jax.evaluation.loglikelihood import score_requests
from reference import DATA, STORIES

ROWS = 3


@pytest.fixture(scope="module")
def stories(assets):
    lines = (DATA / "hellaswag" / "validation.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:ROWS]]
    return (AutoModelForCausalLM.from_pretrained(STORIES), transformers.AutoTokenizer.from_pretrained(STORIES),
            transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval(), rows)


def _torch_loglikelihood(hf, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | everything before it), straight from the HF model."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
    return float(sum(logprobs[t - 1, whole[t]] for t in range(len(context_ids), len(whole))))


def test_loglikelihoods_match_torch_and_metrics_follow_them(stories):
    model, tokenizer, hf, rows = stories
    scored = hellaswag.score(model, tokenizer, rows, batch_size=8)  # 12 requests: 2 batches, the last one padded
    for s in scored:
        expected = [_torch_loglikelihood(hf, tokenizer, s.question.query, " " + c) for c in s.question.choices]
        np.testing.assert_allclose(s.loglikelihoods, expected, atol=1e-4, rtol=0)
    lls = [np.asarray(s.loglikelihoods) for s in scored]
    golds = [s.question.gold for s in scored]
    acc = np.mean([np.argmax(x) == g for x, g in zip(lls, golds)])
    acc_norm = np.mean([np.argmax(x / np.array([len(c) for c in s.question.choices])) == g
                        for x, g, s in zip(lls, golds, scored)])
    result = evaluate(model, tokenizer, "hellaswag", rows, limit=ROWS, batch_size=8)
    assert result == {"task": "hellaswag", "samples": ROWS, "acc": pytest.approx(acc),
                      "acc_norm": pytest.approx(acc_norm)}


def test_preprocessing_is_lm_eval_harness():
    row = {"activity_label": "Home and Garden", "ctx_a": "[header] How to clean a roof [title] Remove debris.",
           "ctx_b": "then YOU", "endings": [" sweep it [step] off. ", "b", "c", "d"], "label": "0"}
    question = hellaswag.question_of(row)
    assert question.query == "Home and Garden: How to clean a roof. Remove debris. Then you"
    assert question.choices == ("sweep it off.", "b", "c", "d") and question.gold == 0


def test_trailing_context_spaces_move_to_the_continuation(stories):
    _, tokenizer, _, _ = stories
    context, continuation = hellaswag.encode_pair(tokenizer, "The cat sat ", "on the mat.")
    assert context == tokenizer("The cat sat")["input_ids"]
    assert context + continuation == tokenizer("The cat sat on the mat.")["input_ids"]


@pytest.mark.parametrize("row, message", [
    ({"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "label": "0"}, r"lacks \['endings'\]"),
    ({"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["e"] * 4, "label": ""}, "no usable gold label"),
])
def test_bad_rows_are_clear_errors(row, message):
    with pytest.raises(ValueError, match=message):
        hellaswag.question_of(row)


def test_bad_requests_and_arguments_are_clear_errors(stories):
    model, tokenizer, _, rows = stories
    with pytest.raises(ValueError, match="request 1 has an empty continuation"):
        score_requests(model, [([1, 5], [7]), ([1, 5], [])])
    with pytest.raises(ValueError, match=r"request 1 has token id 512, outside the model's embedding table "
                                         r"\(vocab_size 512"):
        score_requests(model, [([1, 5], [7]), ([1, 5], [512])])
    with pytest.raises(ValueError, match="unknown evaluation task 'mmlu'"):
        evaluate(model, tokenizer, "mmlu", rows)
    with pytest.raises(ValueError, match="limit 0 must be a positive"):
        evaluate(model, tokenizer, "hellaswag", rows, limit=0)
