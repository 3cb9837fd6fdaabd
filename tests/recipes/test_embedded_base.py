"""Building the embedded default's base model (pre-trained once with the LLM recipe, cached): an interrupted build
resumes from its last checkpoint instead of step 0, and everything the nested run prints is labelled as the base
model's (its "validation loss" line is not the user's run). Pre-training is shortened to 6 steps for the test."""
from __future__ import annotations

import concurrent.futures
import json
import threading

import pytest

from automodel_jax.checkpoint.orbax_io import locate
from automodel_jax.recipes.llm import embedded, finetune

LABEL = "[embedded base model] "


@pytest.mark.slow
def test_an_interrupted_base_build_resumes_and_labels_its_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOMODEL_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(embedded.PRETRAIN, "steps", 6)
    monkeypatch.setitem(embedded.PRETRAIN, "warmup_steps", 1)
    monkeypatch.setattr(embedded, "PRETRAIN_CHECKPOINT_EVERY", 2)
    name = f"{embedded.SCHEME}{embedded.MODEL_NAME}"

    def interrupted(cfg):
        """The recipe's own phases, stopped after step 5 as Ctrl-C would (its checkpoint of step 4 complete)."""
        run = finetune.setup(cfg)
        finetune.train_loop(run, until_step=5)
        run.checkpoints.close()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embedded.materialize(name, finetune.default_config, interrupted)
    root = embedded.cache_dir() / embedded._fingerprint()
    assert locate(root / "pretrain-run")[1] == 4
    capsys.readouterr()

    path = embedded.materialize(name, finetune.default_config, finetune.run)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("building the embedded base model: pre-training")
    assert out[1:] and all(line.startswith(LABEL) for line in out[1:]), out
    assert f"{LABEL}resumed from checkpoint {root / 'pretrain-run' / 'checkpoints' / '4'} (step 4)" in out
    [summary] = [line for line in out if "validation loss" in line]
    assert summary.startswith(f"{LABEL}validation loss: ") and summary.endswith(" after 6 steps")
    assert json.loads((root / embedded.MODEL_NAME / "config.json").read_text())["model_type"] == "llama"
    assert path == str(root / embedded.MODEL_NAME)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [embedded.MODEL_NAME]  # no init or run left


@pytest.mark.slow
def test_runs_started_together_build_the_base_model_once(tmp_path, monkeypatch, capsys):
    """Two commands started at once on a fresh cache: one builds (under the cache's lock), the other waits, says
    so, and uses the finished model; nothing half-written is ever at the model's path."""
    monkeypatch.setenv("AUTOMODEL_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(embedded.PRETRAIN, "steps", 2)
    monkeypatch.setitem(embedded.PRETRAIN, "warmup_steps", 1)
    name = f"{embedded.SCHEME}{embedded.MODEL_NAME}"
    builds, started = [], threading.Event()

    def counted_run(cfg):
        builds.append(cfg.run_dir)
        started.set()
        return finetune.run(cfg)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(embedded.materialize, name, finetune.default_config, counted_run)
        assert started.wait(300)  # the first one holds the lock and trains
        second = pool.submit(embedded.materialize, name, finetune.default_config, counted_run)
        paths = {first.result(), second.result()}
    root = embedded.cache_dir() / embedded._fingerprint()
    assert paths == {str(root / embedded.MODEL_NAME)} and len(builds) == 1
    assert f"waiting for another process to finish building the embedded base model in {root}" in \
        capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [embedded.MODEL_NAME]
