"""Dataset builders on the real Alpaca, SQuAD, HellaSwag and chat files with the real stories260K tokenizer."""
import copy
import json
import logging
from pathlib import Path

import datasets
import ml_collections
import numpy as np
import pytest

from automodel_jax.config import parse_config
from automodel_jax.data import IGNORE, DataError, build_dataset, check_vocabulary, data_defaults, resolve_pad_id

from reference import DATA

REPO = Path(__file__).resolve().parents[2]

ALPACA = DATA / "alpaca" / "alpaca_en_demo.json"
SQUAD = DATA / "squad" / "validation.jsonl"
HELLASWAG = DATA / "hellaswag" / "validation.jsonl"
CHAT = DATA / "chat" / "messages_demo.jsonl"
ALPACA_COLUMNS = dict(instruction="instruction", input="input", answer="output")
ALPACA_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nResponse: "


def builder_records(caplog) -> list:
    """The log records of the dataset builders (other libraries, e.g. datasets, may log at INFO in between)."""
    return [r for r in caplog.records if r.name == "automodel_jax.data.builders"]


def jsonl_rows(path, n):
    with open(path, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def labelled_text(tokenizer, sample):
    return tokenizer.decode(sample["labels"][sample["labels"] != IGNORE], skip_special_tokens=True)


def assert_is_shifted(sample, eos=None):
    """labels[t] is either ignored or the next input token; the last label is the one token past the inputs."""
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids.dtype == labels.dtype == np.int32 and ids.shape == labels.shape and ids.ndim == 1
    kept = labels[:-1] != IGNORE
    np.testing.assert_array_equal(labels[:-1][kept], ids[1:][kept])
    if eos is not None:
        assert labels[-1] == eos and ids[-1] != eos


def instruction_cfg(path, **overrides):
    return {**dict(kind="instruction", path=str(path), limit=40, columns=ALPACA_COLUMNS,
                   prompt_template=ALPACA_TEMPLATE), **overrides}


@pytest.fixture(scope="module")
def alpaca(tokenizer):
    return build_dataset(instruction_cfg(ALPACA), tokenizer, seq_len=2048, truncation="drop")


def test_instruction_labels_are_the_answer_and_eos(tokenizer, alpaca):
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:40]
    assert len(alpaca) == 40 and alpaca.stats == dict(rows=40, samples=40, truncated=0, dropped_too_long=0,
                                                      dropped_no_loss=0)
    for row, sample in zip(rows, alpaca):
        assert sample["input_ids"][0] == tokenizer.bos_token_id
        assert_is_shifted(sample, eos=tokenizer.eos_token_id)
        assert labelled_text(tokenizer, sample) == row["output"]
        prompt_len = int(np.argmax(sample["labels"] != IGNORE)) + 1  # input tokens before the first target
        prompt = tokenizer.decode(sample["input_ids"][:prompt_len], skip_special_tokens=True)
        assert prompt.strip() == ALPACA_TEMPLATE.format(**row).strip()


def test_default_prompt_is_context_space_question_space(tokenizer):
    columns = ml_collections.ConfigDict(dict(question="instruction", context="input", answer="output"))
    ds = build_dataset(dict(kind="instruction", path=str(ALPACA), limit=9, columns=columns), tokenizer, 2048, "drop")
    row = json.loads(ALPACA.read_text(encoding="utf-8"))[8]  # a row with a non-empty input
    assert row["input"]
    assert tokenizer.decode(ds[8]["input_ids"], skip_special_tokens=True) == \
        f"{row['input']} {row['instruction']} {row['output']}"


def test_other_fields_need_a_template(tokenizer):
    with pytest.raises(DataError, match=r"columns \['instruction'\] need a prompt_template"):
        build_dataset(dict(kind="instruction", path=str(ALPACA), columns=dict(instruction="instruction",
                                                                               answer="output")), tokenizer, 64, "drop")


@pytest.mark.parametrize("fmt", ["parquet", "csv", "save_to_disk"])
def test_instruction_from_other_formats_matches_json(tokenizer, alpaca, tmp_path, fmt):
    rows = datasets.Dataset.from_list(json.loads(ALPACA.read_text(encoding="utf-8"))[:40])
    target = tmp_path / f"rows.{fmt}"
    if fmt == "save_to_disk":
        rows.save_to_disk(str(target))
    else:
        getattr(rows, f"to_{fmt}")(str(target))
    ds = build_dataset(instruction_cfg(target), tokenizer, seq_len=2048, truncation="drop")
    assert len(ds) == len(alpaca)
    for a, b in zip(ds, alpaca):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def test_missing_mapped_column_names_expected_and_found(tokenizer):
    with pytest.raises(DataError, match=r"lacks column\(s\) \['response'\]: expected \['response', 'instruction'\], "
                                        r"found \['instruction', 'input', 'output'\]"):
        build_dataset(dict(kind="instruction", path=str(ALPACA), columns=dict(question="instruction",
                                                                               answer="response")), tokenizer, 64,
                      "drop")


@pytest.mark.parametrize("columns, match", [(dict(instruction="instruction"), "must map 'answer'"),
                                            (dict(answer="output"), "at least one prompt field")])
def test_columns_need_an_answer_and_a_prompt(tokenizer, columns, match):
    with pytest.raises(DataError, match=match):
        build_dataset(dict(kind="instruction", path=str(ALPACA), columns=columns), tokenizer, 64, "drop")


def test_template_placeholder_must_be_mapped(tokenizer):
    with pytest.raises(DataError, match=r"prompt_template uses \{context\}, which is not among"):
        build_dataset(instruction_cfg(ALPACA, prompt_template="{context}: "), tokenizer, 64, "drop")


def test_truncate_and_drop_counts_match_the_untruncated_lengths(tokenizer, alpaca):
    seq_len = 160
    too_long = sum(len(s["input_ids"]) > seq_len for s in alpaca)
    assert 0 < too_long < len(alpaca)
    dropped = build_dataset(instruction_cfg(ALPACA), tokenizer, seq_len, "drop")
    assert dropped.stats["dropped_too_long"] == too_long and len(dropped) == len(alpaca) - too_long
    truncated = build_dataset(instruction_cfg(ALPACA), tokenizer, seq_len, "truncate")
    assert truncated.stats["truncated"] == too_long and len(truncated) == len(alpaca)
    for full, cut in zip(alpaca, truncated):
        n = min(len(full["input_ids"]), seq_len)
        np.testing.assert_array_equal(cut["input_ids"], full["input_ids"][:n])
        np.testing.assert_array_equal(cut["labels"], full["labels"][:n])


def test_builder_logs_one_line_with_the_counts(tokenizer, caplog):
    with caplog.at_level("INFO", logger="automodel_jax.data.builders"):
        ds = build_dataset(instruction_cfg(ALPACA), tokenizer, 160, "drop")
    [record] = builder_records(caplog)
    assert (f"{len(ds)} of 40 rows kept at seq_len 160 (0 truncated, {40 - len(ds)} dropped as too long, "
            "0 dropped with no loss tokens)") in record.getMessage()


def test_squad_loss_is_on_the_first_answer_only(tokenizer):
    rows = jsonl_rows(SQUAD, 30)
    ds = build_dataset(dict(kind="squad", path=str(SQUAD), limit=30), tokenizer, 4096, "drop")
    assert len(ds) == 30
    for row, sample in zip(rows, ds):
        assert_is_shifted(sample, eos=tokenizer.eos_token_id)
        assert labelled_text(tokenizer, sample) == row["answers"]["text"][0].strip()
        text = tokenizer.decode(sample["input_ids"], skip_special_tokens=True)
        assert text.startswith("Context: ") and f" Question: {row['question'].strip()}" in text
        assert text.endswith(" Answer: " + row["answers"]["text"][0].strip())


def test_truncation_that_removes_every_target_drops_the_sample(tokenizer):
    ds = build_dataset(dict(kind="squad", path=str(SQUAD), limit=30), tokenizer, 256, "truncate")
    assert ds.stats["truncated"] > 0 and ds.stats["dropped_no_loss"] > 0
    assert ds.stats["samples"] == 30 - ds.stats["dropped_no_loss"] == len(ds)
    assert all((s["labels"] != IGNORE).any() and len(s["input_ids"]) <= 256 for s in ds)


def test_nothing_fitting_is_a_clear_error(tokenizer):
    with pytest.raises(DataError, match="no sample is left after fitting to seq_len 8"):
        build_dataset(dict(kind="squad", path=str(SQUAD), limit=5), tokenizer, 8, "drop")


def test_hellaswag_context_then_gold_ending_with_loss_on_the_ending(tokenizer):
    rows = jsonl_rows(HELLASWAG, 30)
    ds = build_dataset(dict(kind="hellaswag", path=str(HELLASWAG), limit=30), tokenizer, 512, "drop")
    assert len(ds) == 30
    for row, sample in zip(rows, ds):
        assert_is_shifted(sample)
        ending = row["endings"][int(row["label"])]
        assert labelled_text(tokenizer, sample) == ending.strip()
        context = tokenizer(row["ctx"], add_special_tokens=False)["input_ids"]
        ending_ids = tokenizer(ending, add_special_tokens=False)["input_ids"]  # tokenized apart, as NeMo does
        np.testing.assert_array_equal(sample["input_ids"], [tokenizer.bos_token_id] + context + ending_ids[:-1])
        assert (sample["labels"] == IGNORE).sum() == len(context)  # no EOS target after the ending


def test_hellaswag_row_without_label_is_a_clear_error(tokenizer, tmp_path):
    row = {**jsonl_rows(HELLASWAG, 1)[0], "label": ""}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="has no usable gold label"):
        build_dataset(dict(kind="hellaswag", path=str(tmp_path / "test.jsonl")), tokenizer, 512, "drop")


def test_chat_loss_is_on_assistant_turns_only(tokenizer, chat_template):
    rows = jsonl_rows(CHAT, 40)
    ds = build_dataset(dict(kind="chat", path=str(CHAT), limit=40, chat_template=chat_template), tokenizer, 1024,
                       "drop")
    assert len(ds) == 40
    for row, sample in zip(rows, ds):
        assert_is_shifted(sample)
        [user, assistant] = [m["content"][0]["value"] for m in row["messages"]]
        assert labelled_text(tokenizer, sample).strip() == assistant.strip()
        text = tokenizer.decode(sample["input_ids"], skip_special_tokens=True)
        assert text.startswith(f"User: {user}\nAssistant:")


def test_multi_turn_openai_chat(tokenizer, chat_template, tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": [{"type": "text",
                                                                                       "text": "Another?"}]},
                {"role": "assistant", "content": "Red."}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    [sample] = build_dataset(dict(kind="chat", path=str(tmp_path / "chat.jsonl"), chat_template=chat_template),
                             tokenizer, 256, "drop")
    targets = sample["labels"] != IGNORE
    runs = np.split(sample["labels"], np.flatnonzero(np.diff(targets.astype(int))) + 1)
    supervised = [tokenizer.decode(run, skip_special_tokens=True).strip() for run in runs if run[0] != IGNORE]
    assert supervised == ["Blue.", "Red."]


def test_chat_without_template_is_a_clear_error(tokenizer):
    with pytest.raises(DataError, match="has no chat template: set the dataset's `chat_template`"):
        build_dataset(dict(kind="chat", path=str(CHAT)), tokenizer, 256, "drop")


def test_chat_template_that_rewrites_history_is_rejected(tokenizer):
    counting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="prefix-stable template"):
        build_dataset(dict(kind="chat", path=str(CHAT), limit=2, chat_template=counting), tokenizer, 256, "drop")


@pytest.mark.parametrize("content, match", [([{"type": "image", "url": "x.png"}], "only text content parts"),
                                            (7, "must be a string or a list of text parts")])
def test_unusable_message_content_is_a_clear_error(tokenizer, chat_template, tmp_path, content, match):
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=match):
        build_dataset(dict(kind="chat", path=str(tmp_path / "chat.jsonl"), chat_template=chat_template), tokenizer,
                      256, "drop")


def test_mock_is_seeded_full_rows_with_loss_everywhere(tokenizer):
    a, b, c = (build_dataset(dict(kind="mock", num_samples=8, seed=seed), tokenizer, 32, "drop") for seed in (1, 1, 2))
    assert len(a) == 8 and all(len(s["input_ids"]) == 32 and (s["labels"] != IGNORE).all() for s in a)
    assert all(s["input_ids"].max() < len(tokenizer) for s in a)
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))
    assert not all((x["input_ids"] == z["input_ids"]).all() for x, z in zip(a, c))


def test_defaults_section_builds_once_pointed_at_a_local_file(tokenizer):
    data = data_defaults()
    assert data.truncation == "truncate" and data.packing is False and data.pad_with_eos is True
    data.train.path, data.train.limit = str(SQUAD), 4
    ds = build_dataset(data.train, tokenizer, data.seq_len, data.truncation)
    assert len(ds) + ds.stats["dropped_no_loss"] == 4


@pytest.mark.parametrize("cfg, match", [
    (dict(kind="wiki", path="x"), "unknown dataset kind 'wiki'"),
    (dict(kind="squad", path="x", limt=3), r"unknown dataset setting\(s\) \['limt'\]"),
])
def test_bad_dataset_config(tokenizer, cfg, match):
    with pytest.raises(DataError, match=match):
        build_dataset(ml_collections.ConfigDict(cfg), tokenizer, 64, "drop")


def test_bad_truncation_mode(tokenizer):
    with pytest.raises(DataError, match=r"data.truncation must be one of \('truncate', 'drop'\), got 'cut'"):
        build_dataset(dict(kind="mock", num_samples=2), tokenizer, 16, "cut")


def test_pad_id_defaults_to_eos_for_a_tokenizer_without_pad(tokenizer):
    assert tokenizer.pad_token_id is None
    assert resolve_pad_id(tokenizer) == tokenizer.eos_token_id
    assert resolve_pad_id(tokenizer, pad_token_id=0) == 0
    with pytest.raises(DataError, match="has no pad token: set data.pad_token_id, or data.pad_with_eos=True$"):
        resolve_pad_id(tokenizer, pad_with_eos=False)


def test_the_no_pad_hint_suggests_only_what_is_not_set_already(tokenizer):
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    assert no_eos.eos_token_id is None
    with pytest.raises(DataError, match=r"has no pad token: set data.pad_token_id \(it has no EOS token to pad with "
                                        r"either\)$"):
        resolve_pad_id(no_eos, pad_with_eos=True)


def test_token_ids_outside_the_embedding_table_are_refused(tokenizer, chat_template):
    mock = build_dataset(dict(kind="mock", num_samples=64, vocab_size=600), tokenizer, 16, "drop")
    check_vocabulary(tokenizer, 512, pad_id=2)  # the real stories260K tokenizer fits its model
    check_vocabulary(tokenizer, 600, datasets=[mock])
    with pytest.raises(DataError, match=r"the padding id \(data.pad_token_id\) has token id 512, outside the model's "
                                        r"embedding table \(vocab_size 512, ids 0..511\); set data.pad_token_id"):
        check_vocabulary(tokenizer, 512, pad_id=512)
    top = max(int(s["input_ids"].max()) for s in mock)
    with pytest.raises(DataError, match=rf"dataset mock has token id {top}, outside the model's "
                                        r"embedding table \(vocab_size 512"):
        check_vocabulary(tokenizer, 512, datasets=[mock])
    added = copy.deepcopy(tokenizer)
    added.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<tool>"]})
    with pytest.raises(DataError, match=r"the tokenizer's pad token '<pad>' has token id 512, outside the model's "
                                        r"embedding table \(vocab_size 512, ids 0..511\); the tokenizer \(514 tokens\)"):
        check_vocabulary(added, 512)
    check_vocabulary(added, 512, exempt=[512])  # a model that swaps id 512 away before embedding it
    # An added token the data uses is fed, so it is refused (one it never uses is not: Gemma 3 1B's tokenizer
    # carries an image token past its text model's table).
    tool = [build_dataset(dict(kind="chat", path=str(CHAT), limit=2, chat_template=f"<tool>{chat_template}"),
                          added, 256, "drop")]
    with pytest.raises(DataError, match=r"dataset \S+ \(token '<tool>'\) has token id 513"):
        check_vocabulary(added, 512, exempt=[512], datasets=tool)


def lengths_and_loss_starts(dataset) -> tuple[np.ndarray, np.ndarray]:
    """Each untruncated sample's length and the position of its first loss token, read off the samples."""
    return (np.array([len(s["input_ids"]) for s in dataset]),
            np.array([np.flatnonzero(s["labels"] != IGNORE)[0] for s in dataset]))


def test_squad_mostly_lost_to_seq_len_is_an_error_or_a_warning_with_the_seq_len_that_keeps_it(tokenizer, caplog):
    """The real 1000 SQuAD rows at seq_len 256 (stories260K's tokens, median prompt ~530): truncation cuts every
    answer but a few off, so keeping that few is an error unless asked for, and the warning names the counts and the
    seq_len that fits 95% of the rows whole (the smallest such length)."""
    squad = dict(kind="squad", path=str(SQUAD))
    length, loss_start = lengths_and_loss_starts(build_dataset(squad, tokenizer, 4096, "drop"))
    assert len(length) == 1000
    kept = int((loss_start < 256).sum())
    assert 0 < kept < 100
    fits = int(np.sort(length)[949])  # the 950th shortest row
    assert (length <= fits).mean() >= 0.95 > (length <= fits - 1).mean()
    with pytest.raises(DataError) as error:
        build_dataset(squad, tokenizer, 256, "truncate")
    message = str(error.value)
    assert f"dataset {SQUAD}: {kept} of 1000 rows kept at seq_len 256" in message
    assert "fewer than data.min_kept_fraction=0.1 of them" in message and "data.min_kept_fraction=0" in message
    assert f"data.seq_len={fits} would fit 95% of the rows whole" in message
    assert f"{1000 - kept} rows have all their loss tokens after token 256" in message
    assert "data.truncation=" not in message  # it is 'truncate' already

    with caplog.at_level(logging.INFO, logger="automodel_jax.data.builders"):
        ds = build_dataset(squad, tokenizer, 256, "truncate", min_kept_fraction=0)
    [record] = builder_records(caplog)
    assert len(ds) == kept and record.levelno == logging.WARNING
    assert f"{kept} of 1000 rows kept at seq_len 256" in record.getMessage()
    assert f"data.seq_len={fits} would fit 95% of the rows whole" in record.getMessage()

    # stories260K's context is 512 positions: the hint suggests no longer seq_len than the model takes
    with pytest.raises(DataError) as error:
        build_dataset(squad, tokenizer, 256, "truncate", context=512)
    share = (length <= 512).mean()
    assert fits > 512 and f"data.seq_len=512 (the model's context) would fit {share:.0%} of the rows whole" in \
        str(error.value) and f"data.seq_len={fits}" not in str(error.value)


def test_the_truncation_hint_appears_only_where_truncation_would_keep_rows(tokenizer, caplog):
    hellaswag = dict(kind="hellaswag", path=str(HELLASWAG), limit=100)
    length, loss_start = lengths_and_loss_starts(build_dataset(hellaswag, tokenizer, 4096, "drop"))
    too_long, reachable = int((length > 96).sum()), int(((length > 96) & (loss_start < 96)).sum())
    assert 0 < reachable < too_long and too_long - reachable < 10
    with caplog.at_level(logging.WARNING, logger="automodel_jax.data.builders"):
        build_dataset(hellaswag, tokenizer, 96, "drop")
        build_dataset(hellaswag, tokenizer, 96, "truncate")
    dropped, truncated = (r.getMessage() for r in builder_records(caplog))
    assert f"data.truncation='truncate' would keep {reachable} of the {too_long} rows longer than seq_len 96" in dropped
    assert "data.truncation" not in truncated
    assert f"{too_long - reachable} rows have all their loss tokens after token 96" in truncated


def test_alpaca_with_its_input_column_set_from_the_command_line(tokenizer):
    """README's recipe for custom instruction data: a column the preset does not map (Alpaca's `input`) is added
    with --config.data.train.columns.input=input, and the template uses it."""
    template = "Instruction: {instruction}\nInput: {input}\nResponse: "
    cfg = parse_config(["--config", str(REPO / "configs" / "llama_lora.py"), "--config.data.train.kind=instruction",
                        f"--config.data.train.path={ALPACA}", "--config.data.train.limit=12",
                        "--config.data.train.columns={'instruction': 'instruction', 'answer': 'output'}",
                        "--config.data.train.columns.input=input", f"--config.data.train.prompt_template={template}"])
    assert cfg.data.train.columns.to_dict() == dict(instruction="instruction", input="input", answer="output")
    ds = build_dataset(cfg.data.train, tokenizer, 2048, "drop")
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[:12]
    assert len(ds) == 12 and any(row["input"] for row in rows)
    for row, sample in zip(rows, ds):
        prompt_len = int(np.argmax(sample["labels"] != IGNORE)) + 1
        prompt = tokenizer.decode(sample["input_ids"][:prompt_len], skip_special_tokens=True)
        assert prompt.strip() == template.format(**row).strip()
        assert labelled_text(tokenizer, sample) == row["output"]
