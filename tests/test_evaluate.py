"""`python -m automodel_jax.evaluate` on stories260K with the offline HellaSwag and SQuAD files, and its errors."""
import json
import re
import subprocess
import sys

import pytest

from automodel_jax.cli.evaluate import main
from reference import DATA, REPO, STORIES

HELLASWAG = DATA / "hellaswag" / "validation.jsonl"
SQUAD = DATA / "squad" / "validation.jsonl"
pytestmark = pytest.mark.assets


@pytest.mark.slow
def test_cli_scores_hellaswag_and_writes_the_metrics(tmp_path):
    output = tmp_path / "metrics" / "hellaswag.json"
    run = subprocess.run([sys.executable, "-m", "automodel_jax.evaluate", "--model", str(STORIES), "--task",
                          "hellaswag", "--data", str(HELLASWAG), "--limit", "4", "--batch-size", "16", "--output",
                          str(output)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["task"] == "hellaswag" and result["samples"] == 4
    assert all(result[k] in (0.0, 0.25, 0.5, 0.75, 1.0) for k in ("acc", "acc_norm"))
    assert json.loads(output.read_text()) == result


def test_squad_through_main(tmp_path, capsys):
    rows = sorted((json.loads(line) for line in SQUAD.read_text().splitlines()), key=lambda r: len(r["context"]))
    short = tmp_path / "short.jsonl"  # the two shortest contexts: short prompts, a quick run
    short.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert main(["--model", str(STORIES), "--task", "squad", "--data", str(short), "--batch-size", "2",
                 "--max-new-tokens", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "squad" and result["samples"] == 2
    assert 0.0 <= result["exact_match"] <= result["f1"] <= 1.0


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model", "--task", "squad", "--data", str(SQUAD)], "is not a checkpoint directory"),
    (["--model", str(STORIES), "--task", "squad", "--data", "/nonexistent/rows.jsonl"], "does not exist"),
    (["--model", str(STORIES), "--task", "squad", "--data", str(SQUAD), "--limit", "0"], "limit must be a positive"),
    (["--model", str(STORIES), "--task", "hellaswag", "--data", str(SQUAD), "--limit", "1"],
     r"hellaswag row 0 lacks \['activity_label'"),
    (["--model", str(STORIES), "--task", "hellaswag", "--data", str(HELLASWAG), "--batch-size", "0"],
     "batch_size 0 must be >= 1"),
])
def test_bad_input_is_one_clear_error(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err)


def test_a_tokenizer_with_ids_past_the_embedding_table_is_refused(stories_added_pad, capsys):
    assert main(["--model", str(stories_added_pad), "--task", "hellaswag", "--data", str(HELLASWAG),
                 "--limit", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert ("error: the tokenizer's pad token '<pad>' has token id 512, outside the model's embedding table "
            "(vocab_size 512, ids 0..511)") in captured.err
