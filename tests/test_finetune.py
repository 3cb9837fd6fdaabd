"""End-to-end runs of the real recipe on the real stories260K model and HellaSwag rows: the CLI lowers validation loss
and leaves every artifact a user looks for; full SFT exports a whole model; samples longer than seq_len are truncated
or dropped and counted; bad input is one `error:` line naming the bad thing (exit code 2) and never touches an export
directory; a non-finite loss stops training and keeps the last good state as a checkpoint."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from automodel_jax.cli import finetune as finetune_cli
from automodel_jax.recipes.llm import finetune
from automodel_jax.checkpoint.orbax_io import load_checkpoint_model
from automodel_jax.config import parse_config
from automodel_jax.peft.lora import adapters
from reference import DATA, REPO, STORIES, terminal_lines

HELLASWAG = DATA / "hellaswag" / "validation.jsonl"
ALPACA = DATA / "alpaca" / "alpaca_en_demo.json"
TRAIN_ROWS, VALIDATION_ROWS = slice(0, 400), slice(400, 464)
SUMMARY = re.compile(r"validation loss: (\S+) before -> (\S+) after (\d+) steps")
FIT = re.compile(r"dataset (\S+): (\d+) of (\d+) rows kept at seq_len (\d+) \((\d+) truncated, (\d+) dropped as too "
                 r"long, (\d+) dropped with no loss tokens\)(?:; .*)?")


@pytest.fixture(scope="module")
def hellaswag(tmp_path_factory, assets) -> tuple[Path, Path]:
    """HellaSwag has one (validation) file: its rows 0-399 train, rows 400-463 validate (no row in both)."""
    lines = HELLASWAG.read_text(encoding="utf-8").splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("hellaswag")
    paths = folder / "train.jsonl", folder / "validation.jsonl"
    for path, rows in zip(paths, (TRAIN_ROWS, VALIDATION_ROWS)):
        path.write_text("".join(lines[rows]), encoding="utf-8")
    return paths


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """No run may build the embedded model into the user's cache, and main()'s logging setup is undone after each
    test (it installs a root handler on the test's captured stderr)."""
    monkeypatch.setenv("AUTOMODEL_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "automodel_jax_cache"))
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def stories_argv(run_dir: Path, train: Path, validation: Path, *overrides: str) -> list[str]:
    """The recipe's command line for a short float32 LoRA run of stories260K on HellaSwag rows."""
    return ["--config", str(REPO / "configs" / "llama_lora.py"), f"--config.run_dir={run_dir}",
            f"--config.model.path={STORIES}", "--config.model.dtype=float32",
            "--config.data.train.kind=hellaswag", f"--config.data.train.path={train}",
            "--config.data.validation.kind=hellaswag", f"--config.data.validation.path={validation}",
            "--config.data.seq_len=64", "--config.train.max_steps=2", "--config.train.global_batch_size=8",
            "--config.train.micro_batch_size=8", "--config.train.sample_prompts=()", "--config.train.val_every=0",
            "--config.train.log_every=1", "--config.train.val_max_samples=16", "--config.logging.tensorboard=false",
            "--config.optim.schedule.warmup_steps=0", *overrides]


def kept_export(tmp_path: Path) -> tuple[list[str], Path]:
    """Overrides that point the export at a directory holding a user's file, with overwrite on: a failed run must
    leave it alone even so."""
    export = tmp_path / "precious_export"
    export.mkdir()
    (export / "keep.txt").write_text("the user's model")
    return [f"--config.export.dir={export}", "--config.export.overwrite=true"], export


def error_line(capsys) -> str:
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return line


def fit_logs(caplog) -> dict[str, tuple[int, ...]]:
    """{dataset path: (kept, rows, seq_len, truncated, dropped too long, dropped no loss)} from the builders' log."""
    found = {}
    for record in caplog.records:
        match = FIT.fullmatch(record.getMessage())
        if match:
            found[match[1]] = tuple(map(int, match.groups()[1:]))
    return found


def fit_counts(path: Path, seq_len: int) -> tuple[int, int]:
    """(rows too long for seq_len, rows whose gold ending would be cut off entirely), counted directly: a HellaSwag
    sample is BOS + context + gold ending, shifted by one token, with loss on the ending only."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    too_long = cut_off = 0
    for row in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
        context, ending = (tokenizer(text, add_special_tokens=False)["input_ids"]
                           for text in (row["ctx"], row["endings"][int(row["label"])]))
        too_long += len(context) + len(ending) > seq_len  # 1 (BOS) + tokens - 1 (the shift)
        cut_off += 1 + len(context) > seq_len  # the first ending token is predicted at position len(context)
    return too_long, cut_off


@pytest.mark.slow
def test_cli_lora_run_on_hellaswag_lowers_validation_loss(hellaswag, tmp_path):
    train, validation = hellaswag
    run_dir = tmp_path / "run"
    argv = stories_argv(run_dir, train, validation, "--config.data.seq_len=256", "--config.train.max_steps=40",
                        "--config.train.val_every=20", "--config.train.val_max_samples=64",
                        "--config.train.log_every=5", "--config.logging.tensorboard=true",
                        "--config.optim.learning_rate=5e-3", "--config.optim.schedule.warmup_steps=2",
                        "--config.checkpoint.every_steps=20")
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "automodel_jax.finetune", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    before, after, steps = SUMMARY.search(done.stdout).groups()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss"] for r in records if r["split"] == "val"}
    assert sorted(val) == [0, 20, 40] and int(steps) == 40
    assert (f"{val[0]:.4f}", f"{val[40]:.4f}") == (before, after)
    assert val[40] < val[20] < val[0] and val[40] < 0.9 * val[0], val
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(5, 41, 5))

    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG")
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["model"]["path"], saved["data"]["seq_len"], saved["peft"]["method"]) == (str(STORIES), 256, "lora")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["20", "40"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run_dir / "export").iterdir()}


def test_full_sft_truncates_long_samples_counts_them_and_exports_a_whole_model(hellaswag, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="automodel_jax.data.builders")
    train, validation = hellaswag
    run_dir = tmp_path / "run"
    result = finetune.run(parse_config(stories_argv(run_dir, train, validation, "--config.peft.method=none",
                                                    "--config.train.max_steps=3",
                                                    "--config.optim.learning_rate=1e-3")))
    assert result["steps"] == 3 and np.isfinite([result["val_loss_before"], result["val_loss_after"]]).all()

    truncated, no_loss = fit_counts(train, 64)
    assert 0 < no_loss < truncated < 400
    assert fit_logs(caplog)[str(train)] == (400 - no_loss, 400, 64, truncated, 0, no_loss)

    exported, base = load_file(run_dir / "export" / "model.safetensors"), load_file(STORIES / "model.safetensors")
    assert exported.keys() == base.keys()
    changed = [name for name in base if not np.array_equal(exported[name], base[name])]
    assert len(changed) == len(base), "full SFT must train (and export) every weight"
    assert (run_dir / "export" / "config.json").is_file() and (run_dir / "export" / "tokenizer.json").is_file()


def test_drop_mode_drops_long_samples_and_counts_them(hellaswag, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="automodel_jax.data.builders")
    train, validation = hellaswag
    finetune.run(parse_config(stories_argv(tmp_path / "run", train, validation, "--config.data.truncation=drop",
                                           "--config.train.max_steps=1", "--config.export.when=never")))
    logged = fit_logs(caplog)
    (dropped_train, _), (dropped_validation, _) = fit_counts(train, 64), fit_counts(validation, 64)
    assert dropped_train > 0
    assert logged[str(train)] == (400 - dropped_train, 400, 64, 0, dropped_train, 0)
    assert logged[str(validation)] == (64 - dropped_validation, 64, 64, 0, dropped_validation, 0)


@pytest.mark.parametrize(("max_steps", "every_steps"), [(2, 0), (5, 1)], ids=["on_the_last_step", "mid_run"])
def test_non_finite_loss_stops_with_one_error_line_and_keeps_the_last_good_state(hellaswag, tmp_path, capsys,
                                                                                max_steps, every_steps):
    """An absurd learning rate: step 1 is finite and moves the adapters to ~1e30, step 2 overflows float32. The one
    checkpoint is the state after step 1 with its own step count and data position (one batch read), also when the
    checkpoint cadence falls on the bad step or while metrics are read a step behind."""
    train, validation = hellaswag
    run_dir = tmp_path / "run"
    keep, export = kept_export(tmp_path)
    argv = stories_argv(run_dir, train, validation, f"--config.train.max_steps={max_steps}",
                        "--config.optim.learning_rate=1e30", "--config.optim.grad_clip=0",
                        f"--config.checkpoint.every_steps={every_steps}", *keep)
    assert finetune_cli.main(argv) == 2
    line = error_line(capsys)
    assert "step 2:" in line and "is not finite" in line and "optim.learning_rate=1e+30" in line, line
    # the causes named are this run's: no clipping and no warmup, but not precision (it runs in float32)
    assert "optim.grad_clip=1.0" in line and "warmup" in line and "float32" not in line, line

    train_steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if r["split"] == "train"]
    assert train_steps == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["1"]
    handlers = {"data": ocp.JsonCheckpointHandler(), "train": ocp.StandardCheckpointHandler()}
    with ocp.CheckpointManager(run_dir / "checkpoints", item_handlers=handlers) as manager:
        saved = manager.restore(1, args=ocp.args.Composite(data=ocp.args.JsonRestore(),
                                                            train=ocp.args.StandardRestore()))
    assert int(saved["train"]["step"]) == 1 and saved["data"]["position"] == {"epoch": 0, "batch": 1}
    model, meta = load_checkpoint_model(run_dir)
    trained = [x for pair in adapters(model).values() for x in pair]
    assert meta["peft"]["method"] == "lora" and trained
    assert all(bool(jax.numpy.isfinite(x).all()) for x in trained)
    assert max(float(abs(x).max()) for x in trained) > 1e20, "the checkpoint is not the state after step 1"
    assert [p.name for p in export.iterdir()] == ["keep.txt"]


def test_the_non_finite_message_names_only_causes_that_apply_to_the_run():
    from automodel_jax.training.loop import nonfinite_causes
    careful = parse_config(["--config", str(REPO / "configs" / "llama_lora.py"), "--config.model.dtype=float32",
                            "--config.optim.grad_clip=1.0", "--config.optim.schedule.warmup_steps=10",
                            "--config.optim.learning_rate=2e-4"])
    assert nonfinite_causes(careful) == ("Likely causes in this run: a learning rate too high for this model "
                                         "(optim.learning_rate=0.0002: lower it).")
    risky = parse_config(["--config", str(REPO / "configs" / "llama_lora.py"), "--config.model.dtype=bfloat16",
                          "--config.optim.grad_clip=0", "--config.optim.schedule.warmup_steps=0"])
    causes = nonfinite_causes(risky)
    assert "no gradient clipping (set optim.grad_clip=1.0)" in causes and "no warmup" in causes
    assert "reduced precision (model.dtype=bfloat16: try float32)" in causes


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["--config.model.path=/nonexistent/stories"], ["model path '/nonexistent/stories' is not a checkpoint"]),
    (["--config.peft.method=lorra"], ["peft.method must be one of 'lora', 'none'", "did you mean 'lora'?"]),
    (["--config.data.train.kind=instruction", f"--config.data.train.path={ALPACA}",
      "--config.data.train.columns.answer=response"],  # the preset maps instruction; Alpaca's answers are `output`
     [str(ALPACA), "lacks column(s) ['response']", "found ['instruction', 'input', 'output']",
      "set the dataset's columns.answer to columns the file has"]),
    (["--config.data.train.path={empty}"], ["{empty}", "no rows"]),
    (["--config.data.seq_len=8", "--config.data.truncation=drop"],
     ["{train}: no sample is left after fitting to seq_len 8", "400 dropped as too long", "data.seq_len=",
      "would fit 95% of the rows whole"]),
    (["--config.data.pad_with_eos=false"], ["has no pad token", "data.pad_token_id", "data.pad_with_eos=True"]),
    (["--config.model.path={added_pad}"],
     ["the tokenizer's pad token '<pad>' has token id 512, outside the model's embedding table (vocab_size 512",
      "use the model's own tokenizer"]),
    (["--config.data.pad_token_id=600"],
     ["the padding id (data.pad_token_id) has token id 600, outside the model's embedding table (vocab_size 512",
      "set data.pad_token_id to an id below 512"]),
    (["--config.data.seq_len=1024"],
     ["data.seq_len 1024 needs 1024 positions, more than the model's context of 512 (max_position_embeddings",
      "set data.seq_len to at most 512"]),
    (["--config.train.sample_prompts=('Once upon a time',)", "--config.train.sample_max_new_tokens=600"],
     ["train.sample_prompts[0] (5 tokens) + train.sample_max_new_tokens 600 needs 605 positions, more than the "
      "model's context of 512", "set train.sample_max_new_tokens to at most 507"]),
    (["--config.peft.target_modules=('*_proj','lm_head')"],  # stories260K ties lm_head to its embeddings
     ["'lm_head' names lm_head", "tie_word_embeddings=true", "peft.exclude_modules"]),
], ids=["missing_model", "unknown_method", "missing_column", "empty_dataset", "all_too_long", "no_pad_token",
        "tokenizer_past_the_embeddings", "pad_id_past_the_vocabulary", "seq_len_past_the_context",
        "sample_generation_past_the_context", "tied_lm_head_target"])
def test_bad_input_is_one_error_line_and_leaves_the_export_alone(hellaswag, stories_added_pad, tmp_path, capsys,
                                                                overrides, fragments):
    train, validation = hellaswag
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    names = dict(empty=empty, train=train, added_pad=stories_added_pad)
    keep, export = kept_export(tmp_path)
    argv = stories_argv(tmp_path / "run", train, validation, *keep, *(o.format(**names) for o in overrides))
    assert finetune_cli.main(argv) == 2
    line = error_line(capsys)
    assert all(fragment.format(**names) in line for fragment in fragments), line
    assert [p.name for p in export.iterdir()] == ["keep.txt"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_non_empty_export_dir_is_refused_before_anything_runs(hellaswag, tmp_path, capsys):
    train, validation = hellaswag
    run_dir = tmp_path / "run"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "adapter_model.safetensors").write_bytes(b"an earlier run's adapter")
    assert finetune_cli.main(stories_argv(run_dir, train, validation)) == 2
    line = error_line(capsys)
    assert f"export directory {run_dir / 'export'} is not empty" in line and "export.overwrite=true" in line
    assert [p.name for p in run_dir.iterdir()] == ["export"]
    assert (run_dir / "export" / "adapter_model.safetensors").read_bytes() == b"an earlier run's adapter"


def test_evaluation_at_the_end_of_training_writes_hellaswag_scores(hellaswag, tmp_path):
    """evaluation.task=hellaswag scores the trained model (acc, acc_norm over `limit` rows) and saves them."""
    train, validation = hellaswag
    run_dir = tmp_path / "run"
    argv = stories_argv(run_dir, train, validation, "--config.evaluation.task=hellaswag",
                        f"--config.evaluation.data={validation}", "--config.evaluation.split=train",
                        "--config.evaluation.limit=8", "--config.export.when=never")
    result = finetune.run(parse_config(argv))
    scores = json.loads((run_dir / "evaluation.json").read_text())
    assert scores == result["evaluation"]
    assert scores["task"] == "hellaswag" and scores["samples"] == 8
    for value in (scores["acc"], scores["acc_norm"]):  # a mean over 8 rows of 0/1 outcomes
        assert 0.0 <= value <= 1.0 and (value * 8) == round(value * 8)


def test_evaluation_without_data_is_a_clear_error(hellaswag, tmp_path, capsys):
    train, validation = hellaswag
    argv = stories_argv(tmp_path / "run", train, validation, "--config.evaluation.task=hellaswag")
    assert finetune_cli.main(argv) == 2
    assert "evaluation.data is empty" in error_line(capsys)


@pytest.mark.parametrize("packing", [False, True])
def test_one_epoch_trains_on_each_sample_once(hellaswag, tmp_path, packing):
    """num_epochs=1 without max_steps on 48 rows: the run's steps are one epoch counted in (packed) global batches,
    and those batches hold each training sample exactly once."""
    from collections import Counter

    from automodel_jax.data import build_dataset
    train, validation = hellaswag
    cfg = parse_config(stories_argv(tmp_path / "run", train, validation, "--config.data.train.limit=48",
                                    "--config.data.seq_len=256", f"--config.data.packing={packing}"))
    cfg.train.max_steps = None
    run_ = finetune.setup(cfg)
    try:
        samples = build_dataset(cfg.data.train, run_.tokenizer, 256, "truncate")
        batches = [next(run_.loader) for _ in range(run_.total_steps)]
    finally:
        run_.logger.close()
        run_.checkpoints.close()
    assert len(samples) == 48  # unpacked: 8 rows a step; packed: several samples of 30-140 tokens share a row
    assert run_.total_steps < 6 if packing else run_.total_steps == 6
    seen = Counter()
    for batch in batches:
        for row, ids in enumerate(batch["segment_ids"]):
            for segment in range(1, ids.max() + 1):
                seen[tuple(batch["input_ids"][row][ids == segment])] += 1
    assert seen == Counter(tuple(s["input_ids"]) for s in samples)


BAR = re.compile(r"\|\s*\d+/\d+ \[")  # a tqdm progress bar: "...| 3/3 [00:01<00:00, ...]"


def assert_bar_and_prints_never_share_a_line(output: str) -> None:
    """In stdout and stderr as one terminal shows them: a line showing the progress bar shows nothing else."""
    for line in terminal_lines(output):
        assert not BAR.search(line) or line.endswith("]"), line


@pytest.mark.slow
def test_resumed_run_says_so_and_keeps_one_metrics_row_per_step(hellaswag, tmp_path, capsys):
    """A run killed after step 3 (its checkpoint 3 never written) is rerun: it resumes from checkpoint 2, says so
    instead of "before fine-tuning", and metrics.jsonl keeps one row per step and split (the rerun's). The rerun's
    output, stdout and stderr together as a terminal shows them, never puts the progress bar and printed lines on
    one line."""
    train, validation = hellaswag
    run_dir = tmp_path / "run"
    argv = stories_argv(run_dir, train, validation, "--config.train.max_steps=3", "--config.train.val_every=2",
                        "--config.checkpoint.every_steps=2", "--config.train.sample_prompts=('Once upon',)",
                        "--config.train.sample_max_new_tokens=4", "--config.export.when=never")
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    assert finetune_cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "--- generations before fine-tuning ---" in first and SUMMARY.search(first)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_rows = {(r["split"], r["step"]): r for r in rows}
    shutil.rmtree(run_dir / "checkpoints" / "3")
    (run_dir / "complete.json").unlink()  # a killed run never records that it completed

    done = subprocess.run([sys.executable, "-m", "automodel_jax.finetune", *argv], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    second = done.stdout
    assert_bar_and_prints_never_share_a_line(second)
    assert "before" not in second, second
    assert "--- generations when resumed from step 2 ---" in second
    assert re.search(r"^validation loss: \S+ when resumed from step 2 -> \S+ after 3 steps$", second, re.MULTILINE)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [("val", 0), ("train", 1), ("train", 2), ("val", 2),
                                                      ("train", 3), ("val", 3)]
    assert rows[:3] == [first_rows[k] for k in (("val", 0), ("train", 1), ("train", 2))]  # kept from the first run
    assert rows[3]["loss"] == pytest.approx(first_rows["val", 2]["loss"], rel=1e-5)  # the same state, measured anew
    assert {"tokens_per_sec", "label_tokens_per_sec", "tokens_per_sec_per_device", "step_time"} <= set(rows[4])
    assert rows[4]["tokens_per_sec"] > rows[4]["label_tokens_per_sec"] > 0


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_a_run_dir_that_cannot_be_written_is_one_line_before_anything_loads(hellaswag, tmp_path, capsys, where):
    """A run_dir under a plain file, or in a directory this process cannot create entries in (/proc refuses even
    root), fails at once with one line naming run_dir, before the model or data load."""
    train, validation = hellaswag
    (tmp_path / "afile").write_text("not a directory")
    run_dir = tmp_path / "afile" / "run" if where == "under_a_file" else Path("/proc/automodel_jax_run")
    assert finetune_cli.main(stories_argv(run_dir, train, validation)) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: run_dir {run_dir}") and "set run_dir to a" in line, line
    assert (tmp_path / "afile").read_text() == "not a directory"


def test_an_unknown_dataset_kind_fails_before_anything_is_built(hellaswag, tmp_path, capsys):
    """A typo in a dataset section is one line naming the section, before the planner compiles or weights load (no
    run directory is written)."""
    train, validation = hellaswag
    argv = stories_argv(tmp_path / "run", train, validation, "--config.data.validation.kind=alpaca")
    assert finetune_cli.main(argv) == 2
    assert "data.validation: unknown dataset kind 'alpaca'" in error_line(capsys)
    assert not (tmp_path / "run").exists()
