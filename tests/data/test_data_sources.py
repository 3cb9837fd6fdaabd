"""load_rows on every supported source (real Alpaca rows re-written as parquet, csv and save_to_disk) and its errors."""
import json

import datasets
import pytest

from automodel_jax.data import DataError, load_rows
from automodel_jax.data.sources import require_columns
from reference import DATA

ALPACA = DATA / "alpaca" / "alpaca_en_demo.json"


@pytest.fixture(scope="module")
def alpaca_rows(assets):
    return json.loads(ALPACA.read_text(encoding="utf-8"))[:20]


def test_json_file_matches_the_raw_rows(alpaca_rows):
    rows = load_rows(str(ALPACA), limit=20)
    assert rows.to_list() == alpaca_rows


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl", "save_to_disk", "save_to_disk_dict"])
def test_every_local_format_gives_the_same_rows(tmp_path, alpaca_rows, fmt):
    ds = datasets.Dataset.from_list(alpaca_rows)
    target = tmp_path / fmt
    if fmt == "save_to_disk":
        ds.save_to_disk(str(target))
    elif fmt == "save_to_disk_dict":
        datasets.DatasetDict(train=ds.select(range(5)), validation=ds).save_to_disk(str(target))
    else:
        target = tmp_path / f"rows.{fmt}"
        getattr(ds, {"jsonl": "to_json"}.get(fmt, f"to_{fmt}"))(str(target))
        if fmt == "csv":  # csv cannot tell an empty string from a missing value
            alpaca_rows = [{k: v or None for k, v in row.items()} for row in alpaca_rows]
    assert load_rows(str(target), split="validation").to_list() == alpaca_rows


@pytest.mark.assets
def test_limit_takes_the_first_rows():
    assert len(load_rows(str(ALPACA), limit=7)) == 7
    with pytest.raises(DataError, match="limit must be"):
        load_rows(str(ALPACA), limit=0)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_unsupported_file_type(tmp_path):
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_rows(str(tmp_path / "rows.txt"))


@pytest.mark.parametrize("name, text", [("empty.csv", "instruction,input,output\n"), ("empty.jsonl", ""),
                                        ("empty.json", "[]"), ("broken.jsonl", '{"instruction": \n')])
def test_empty_or_malformed_file_is_a_clear_error(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match="could not load .*: it has no rows or is not readable"):
        load_rows(str(tmp_path / name))


def test_empty_saved_dataset_is_a_clear_error(tmp_path):
    datasets.Dataset.from_dict({"instruction": [], "output": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="could not load .*: it has no rows"):
        load_rows(str(tmp_path / "empty"))


def test_missing_split_of_a_saved_dataset_dict(tmp_path, alpaca_rows):
    datasets.DatasetDict(train=datasets.Dataset.from_list(alpaca_rows)).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"has splits \['train'\], not 'test'"):
        load_rows(str(tmp_path / "dd"), split="test")


def test_empty_path():
    with pytest.raises(DataError, match="data path is empty"):
        load_rows("")


@pytest.mark.assets
def test_missing_column_names_expected_and_found_and_the_setting_to_change():
    rows = load_rows(str(ALPACA), limit=3)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['answer'\]: expected \['instruction', 'answer'\], "
                                        r"found \['instruction', 'input', 'output'\]; set the dataset's columns.answer "
                                        r"to columns the file has$"):
        require_columns(rows, {"instruction": "columns.instruction", "answer": "columns.answer"}, str(ALPACA))


@pytest.mark.assets
def test_missing_fixed_columns_do_not_suggest_a_setting_that_cannot_change_them():
    rows = load_rows(str(ALPACA), limit=3)
    with pytest.raises(DataError, match=r"lacks column\(s\) \['context', 'answers'\].*; this kind's columns are fixed: "
                                        r"rename them in the file, or use kind='instruction' with `columns`$"):
        require_columns(rows, dict.fromkeys(["context", "answers"]), str(ALPACA))
