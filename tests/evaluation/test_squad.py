"""SQuAD v1.1 exact match / F1 normalisation, and greedy answers on stories260K checked against HF torch generate."""
import json

import pytest
import torch
import transformers

from automodel_jax import AutoModelForCausalLM
from automodel_jax.evaluation import evaluate, squad
from reference import DATA, STORIES


@pytest.mark.parametrize("text, normalized", [
    ("The  Denver Broncos!", "denver broncos"),
    ("an apple, a pear and THE plum.", "apple pear and plum"),
    ("theater at the other end", "theater at other end"),   # articles only as whole words
    ("  1,000\tmiles ", "1000 miles"),
    ("«Zürich»", "«zürich»"),                                # only ASCII punctuation goes, as in the official script
])
def test_normalize_answer(text, normalized):
    assert squad.normalize_answer(text) == normalized


@pytest.mark.parametrize("prediction, golds, em, f1", [
    ("Denver Broncos", ["Broncos", "the Denver Broncos"], 1.0, 1.0),
    ("Denver Broncos team", ["Denver Broncos"], 0.0, 0.8),            # P 2/3, R 1
    ("go go stop", ["go stop", "stop"], 0.0, 0.8),                   # repeated tokens count once per match
    ("Carolina Panthers", ["Denver Broncos", "Panthers"], 0.0, 2 / 3),  # max over gold answers
    ("the", ["a"], 1.0, 0.0),                                        # both normalise to empty: equal, no tokens
    ("", ["Denver"], 0.0, 0.0),
])
def test_exact_match_and_f1(prediction, golds, em, f1):
    assert squad.exact_match(prediction, golds) == em
    assert squad.f1(prediction, golds) == pytest.approx(f1)


@pytest.mark.assets
def test_long_prompts_keep_bos_and_the_question():
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    row = {"context": "Once upon a time there was a cat. " * 40, "question": "Who was there?"}
    ids = squad.prompt_ids(tokenizer, row, limit=50)
    assert len(ids) == 50 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids).endswith("Question: Who was there? Answer:")


@pytest.mark.assets
def test_greedy_answers_match_hf_and_metrics_follow_them():
    rows = [json.loads(line) for line in (DATA / "squad" / "validation.jsonl").read_text().splitlines()[:3]]
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    scored = squad.score(model, tokenizer, rows, batch_size=4, max_new_tokens=8)
    for row, s in zip(rows, scored):
        ids = squad.prompt_ids(tokenizer, row, limit=512 - 8)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip().split("\n")[0].strip()
        assert s["prediction"] == expected
        assert s["golds"] == row["answers"]["text"]
        assert (s["exact_match"], s["f1"]) == (squad.exact_match(expected, s["golds"]), squad.f1(expected, s["golds"]))
    result = evaluate(model, tokenizer, "squad", rows, batch_size=4, max_new_tokens=8)
    assert result == {"task": "squad", "samples": 3,
                      "exact_match": pytest.approx(sum(s["exact_match"] for s in scored) / 3),
                      "f1": pytest.approx(sum(s["f1"] for s in scored) / 3)}


def test_rows_without_answers_are_clear_errors():
    with pytest.raises(ValueError, match="squad row 0 has no gold answer"):
        squad.score(None, None, [{"context": "c", "question": "q", "answers": {"text": []}}])
