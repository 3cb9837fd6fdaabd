"""The VLM recipe end to end on tiny Gemma 3 and Qwen2.5-VL models with real processors: LoRA on the language model
learns, checkpoints resume exactly, adapters export; full SFT keeps the frozen groups frozen; real receipts (CORD-v2
style) train; bad input is one clear error."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from automodel_jax.auto import save_pretrained
from automodel_jax.cli import finetune as finetune_cli
from automodel_jax.config import parse_config
from automodel_jax.models.base import build_model
from automodel_jax.models.params import flatten, path_str, pure_dict
from automodel_jax.peft.lora import adapters
from automodel_jax.recipes.vlm import embedded
from automodel_jax.recipes.vlm import finetune
from reference import ASSETS, REPO, STORIES

CONFIGS = {"gemma3": "gemma3_vl_lora.py", "qwen2_5_vl": "qwen2_5_vl_lora.py"}
VISION = {"gemma3": "vision_tower", "qwen2_5_vl": "visual"}
EMBED = {"gemma3": "language_model.model.embed_tokens", "qwen2_5_vl": "model.embed_tokens"}


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AUTOMODEL_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "automodel_jax_cache"))
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    """(model type, directory): a random tiny model of the embedded default's shape with its real processor."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    info = embedded.build_processor(model_type, root / "processor")
    save_pretrained(build_model(embedded.tiny_hf_config(info)), root / "model")
    for f in (root / "processor").iterdir():
        shutil.copy(f, root / "model" / f.name)
    return model_type, root / "model"


def argv(model_type: str, model: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "configs" / CONFIGS[model_type]), f"--config.run_dir={run_dir}",
            f"--config.model.path={model}", "--config.data.train.limit=48", "--config.data.validation.limit=16",
            "--config.train.global_batch_size=8", "--config.train.micro_batch_size=4", "--config.train.max_steps=6",
            "--config.train.val_every=0", "--config.train.log_every=2", "--config.evaluation.samples=0",
            "--config.checkpoint.every_steps=3", "--config.optim.schedule.name=constant",
            "--config.optim.schedule.warmup_steps=0", "--config.logging.tensorboard=false", *overrides]


def test_lora_learns_resumes_exactly_and_exports(tiny, tmp_path):
    model_type, model = tiny
    straight = finetune.run(parse_config(argv(model_type, model, tmp_path / "straight")))
    assert straight["val_loss_after"] < straight["val_loss_before"]
    targets = sorted(adapters(straight["model"]))
    assert targets and not any(t.startswith(VISION[model_type]) for t in targets)  # vision tower frozen: no LoRA
    assert (tmp_path / "straight" / "export" / "adapter_model.safetensors").is_file()

    finetune.run(parse_config(argv(model_type, model, tmp_path / "resumed", "--config.train.max_steps=3",
                                   "--config.export.when=never")))
    resumed = finetune.run(parse_config(argv(model_type, model, tmp_path / "resumed")))
    for name, (a, b) in adapters(straight["model"]).items():
        a2, b2 = adapters(resumed["model"])[name]
        np.testing.assert_allclose(np.asarray(a2), np.asarray(a), atol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.asarray(b2), np.asarray(b), atol=1e-6, err_msg=name)
    metrics = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("split") == "train" for m in metrics)


def test_full_sft_keeps_frozen_groups_frozen(tiny, tmp_path):
    model_type, model = tiny
    from automodel_jax.checkpoint.hf import load_pretrained
    before = flatten(pure_dict(load_pretrained(model)))
    result = finetune.run(parse_config(argv(model_type, model, tmp_path / "sft", "--config.peft.method=none",
                                            "--config.train.max_steps=2", "--config.export.when=never",
                                            "--config.optim.learning_rate=1e-3")))
    after = flatten(pure_dict(result["model"]))
    changed = {path_str(p) for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))}
    assert not any(p.startswith((VISION[model_type], EMBED[model_type])) for p in changed)
    assert any(".layers." in p and p.endswith("kernel") for p in changed)


@pytest.mark.assets
def test_real_receipts_train_through_the_processor(tmp_path):
    """CORD-v2 style rows (SROIE receipts): the gt_parse JSON is the target; the long targets are truncated."""
    info = embedded.build_processor("gemma3", tmp_path / "processor")
    save_pretrained(build_model(embedded.tiny_hf_config(info)), tmp_path / "model")
    for f in (tmp_path / "processor").iterdir():
        shutil.copy(f, tmp_path / "model" / f.name)
    sroie = ASSETS / "data" / "vlm" / "sroie_small"
    result = finetune.run(parse_config(argv("gemma3", tmp_path / "model", tmp_path / "run",
                                            "--config.data.train.kind=cord", f"--config.data.train.path={sroie}",
                                            "--config.data.validation.kind=cord",
                                            f"--config.data.validation.path={sroie}",
                                            "--config.data.train.limit=8", "--config.data.validation.limit=4",
                                            "--config.data.seq_len=256", "--config.data.truncation=truncate",
                                            "--config.train.max_steps=2", "--config.export.when=never")))
    assert np.isfinite(result["val_loss_after"])


@pytest.mark.assets
def test_a_text_only_model_is_a_clear_error(tmp_path, capsys):
    code = finetune_cli.main(["--config", str(REPO / "configs" / "gemma3_vl_lora.py"),
                              f"--config.run_dir={tmp_path / 'run'}", f"--config.model.path={STORIES}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not a vision-language model" in err and "llama" in err


def test_a_model_without_a_processor_is_a_clear_error(tmp_path, capsys):
    info = embedded.build_processor("gemma3", tmp_path / "processor")
    save_pretrained(build_model(embedded.tiny_hf_config(info)), tmp_path / "model")  # no processor files beside it
    code = finetune_cli.main(["--config", str(REPO / "configs" / "gemma3_vl_lora.py"),
                              f"--config.run_dir={tmp_path / 'run'}", f"--config.model.path={tmp_path / 'model'}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(tmp_path / "model") in err


@pytest.mark.parametrize(("override", "fragment"), [
    ("--config.data.max_images=0", "data.max_images must be >= 1"),
    ("--config.peft.method=none --config.model.freeze_vision_tower=true --config.model.freeze_embeddings=true "
     "--config.model.freeze_language_model=true", "full SFT would train nothing"),
    ("--config.data.truncation=cut", "data.truncation"),
])
def test_bad_vlm_settings_are_one_clear_error(tmp_path, capsys, override, fragment):
    code = finetune_cli.main(["--config", str(REPO / "configs" / "gemma3_vl_lora.py"),
                              f"--config.run_dir={tmp_path / 'run'}", *override.split()])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and fragment in err
    assert not (tmp_path / "run" / "checkpoints").exists()
