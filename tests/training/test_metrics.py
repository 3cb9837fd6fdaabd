import json
import logging
import sys
import time

import jax.numpy as jnp
import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from automodel_jax.config import ConfigError
from automodel_jax.training.metrics import MetricsLogger, loss_curves, wandb_defaults
from reference import terminal_lines

TRAIN = [(1, {"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.5}), (2, {"loss": 2.0, "learning_rate": 2e-4})]
VAL = [(2, {"loss": 2.25})]


def log_all(logger):
    for step, metrics in TRAIN:
        logger.log(step, metrics, "train")
    for step, metrics in VAL:
        logger.log(step, metrics, "val")


def test_jsonl_lines_hold_step_split_and_values(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=2)
    log_all(logger)
    logger.log(3, {"loss": jnp.float32(1.5)}, "train")  # device scalars are accepted
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "split": "train", "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.5}
    assert rows[2] == {"step": 2, "split": "val", "loss": 2.25}
    assert rows[3] == {"step": 3, "split": "train", "loss": 1.5}


def test_tensorboard_scalars_read_back(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True, wandb=None, total_steps=2)
    log_all(logger)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["tensors"]) == {"train/loss", "train/learning_rate", "train/grad_norm", "val/loss"}
    read = {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
            for tag in ("train/loss", "val/loss")}
    assert read["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert read["val/loss"] == [(2, 2.25)]


def test_progress_bar_shows_step_and_metrics(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=10)
    logger.progress(4, {"loss": 2.0, "learning_rate": 3e-4, "grad_norm": 0.5, "tokens_per_sec": 1234.4})
    logger.progress(5, {"loss": 1.9, "learning_rate": 3e-4})
    logger.close()
    shown = capsys.readouterr().err.split("\r")[-1]
    assert "5/10" in shown and "loss=1.9000" in shown and "lr=3.00e-04" in shown
    assert "gnorm" not in shown  # only what the latest step reported


def test_progress_bar_shows_every_known_metric(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=10)
    logger.progress(1, {"loss": 2.0, "learning_rate": 3e-4, "grad_norm": 0.5, "tokens_per_sec": 1234.4})
    logger.close()
    shown = capsys.readouterr().err
    for text in ("1/10", "loss=2.0000", "lr=3.00e-04", "gnorm=0.500", "tok/s=1234", "<"):  # "<" precedes the ETA
        assert text in shown


def test_log_records_print_above_the_bar_and_the_ended_bar_leaves_a_whole_line(tmp_path, capsys):
    handler = logging.StreamHandler(sys.stderr)  # as the CLI's logging setup: records on stderr, with the bar
    logging.root.addHandler(handler)
    try:
        logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=4)
        logger.progress(1, {"loss": 2.0, "mfu": 0.4567})
        logging.getLogger("automodel_jax.test").warning("saved a checkpoint")
        logger.progress(2, {"loss": 1.5})
        logger.end_progress()
        print("validation loss: 1.5", file=sys.stderr)
    finally:
        logging.root.removeHandler(handler)
    output = capsys.readouterr().err
    lines = terminal_lines(output)
    assert "saved a checkpoint" in lines and "validation loss: 1.5" in lines  # each a line of its own
    assert any(line.endswith("loss=1.5000]") for line in lines) and "mfu=45.7%" in output


def test_a_resumed_run_drops_the_rows_it_logs_again(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=4)
    for step in (1, 2, 3):
        logger.log(step, {"loss": float(step)}, "train")
        logger.log(step, {"loss": float(step)}, "val")
    logger.close()
    resumed = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=4, resumed_step=2)
    resumed.log(2, {"loss": 2.5}, "val")
    resumed.log(3, {"loss": 3.5}, "train")
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["loss"]) for r in rows] == [(1, "train", 1.0), (1, "val", 1.0),
                                                                  (2, "train", 2.0), (2, "val", 2.5),
                                                                  (3, "train", 3.5)]


def test_plot_losses_draws_train_and_val(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=2)
    assert logger.plot_losses() is None  # nothing logged yet
    log_all(logger)
    path = logger.plot_losses()
    logger.close()
    assert path == tmp_path / "loss.png"
    rgb = matplotlib.image.imread(path)[..., :3]
    for color in ("C0", "C1"):  # the train and the val line, in matplotlib's first two colors
        near = np.abs(rgb - matplotlib.colors.to_rgb(color)).max(axis=-1) < 0.05
        assert near.sum() > 100, f"no {color} curve in loss.png"


def test_loss_curves_read_back_per_split_and_latest_wins(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=2)
    log_all(logger)
    logger.log(1, {"grad_norm": 1.0}, "train")  # a line without a loss is not a point
    logger.log(2, {"loss": 1.75}, "train")  # a resumed run logs step 2 again
    logger.close()
    assert loss_curves(tmp_path / "metrics.jsonl") == {"train": {1: 2.5, 2: 1.75}, "val": {2: 2.25}}


def test_disabled_logger_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(run_dir, enabled=False, tensorboard=True, wandb=None, total_steps=2)
    log_all(logger)
    logger.progress(1, {"loss": 1.0})
    assert logger.plot_losses() is None
    logger.close()
    assert not run_dir.exists() and capsys.readouterr().err == ""


def test_reserved_metric_names_are_rejected(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=None, total_steps=2)
    with pytest.raises(ValueError, match=r"metric names \['step'\] are reserved"):
        logger.log(1, {"step": 1.0}, "train")
    logger.close()


def enabled_wandb(**fields):
    cfg = wandb_defaults()
    cfg.update(dict(enabled=True, project="tests", name="offline-check", **fields))
    return cfg


def test_wandb_needs_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when it is not installed
    with pytest.raises(ImportError, match="wandb.enabled is set but wandb is not installed: pip install wandb"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=enabled_wandb(), total_steps=2)


def test_wandb_mode_must_be_known(tmp_path):
    with pytest.raises(ConfigError, match="wandb.mode must be one of 'offline', 'online'; got 'local'"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=enabled_wandb(mode="local"), total_steps=2)


def read_wandb_records(run_file):
    """Records of an offline W&B run file (a LevelDB-style log of Record protos in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = run_file.read_bytes(), 32768, 7  # 7-byte file header: ":W&B", magic, version
    assert data[:4] == b":W&B"
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a record header: the block is padded
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wait_for_finished_run(run_file, timeout_s=30.0):
    """The run's records once its exit record is on disk: W&B's core process writes the file
    asynchronously, and ``finish()`` can return a few milliseconds before it is flushed."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(run_file)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def history_rows(records):
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in records
        if record.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_run_holds_the_logged_values(tmp_path, monkeypatch):
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(
        tmp_path, enabled=True, tensorboard=False, wandb=enabled_wandb(), total_steps=2,
        run_config={"seed": 3},
    )
    log_all(logger)
    logger.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = wait_for_finished_run(run_file)
    rows = history_rows(records)
    assert [(row["_step"], row["train/loss"]) for row in rows] == [(1, 2.5), (2, 2.0)]
    assert rows[1]["val/loss"] == 2.25 and rows[0]["train/grad_norm"] == 1.5
    (run,) = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("tests", "offline-check")
    assert {item.key: item.value_json for item in run.config.update}["seed"] == "3"
