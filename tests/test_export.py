"""Export of a real (short) LoRA run: the recipe's final PEFT export, and `python -m automodel_jax.export` of its
checkpoints as a PEFT adapter or a merged model that transformers and peft load with the trained model's logits."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from automodel_jax.checkpoint.safetensors_io import CheckpointError
from automodel_jax.config import ConfigError, load_config_file
from automodel_jax.cli.export import main as export_main
from automodel_jax.cli.generate import main as generate_main
from automodel_jax.recipes.llm.finetune import resolve_path, run

REPO = Path(__file__).resolve().parents[1]
IDS = np.random.default_rng(0).integers(4, 100, size=(2, 10))


def lora_config(run_dir: Path, **export):
    cfg = load_config_file(str(REPO / "configs" / "llama_lora.py"))
    cfg.run_dir = str(run_dir)
    cfg.train.update(max_steps=3, sample_prompts=(), val_max_samples=32, val_every=0)
    cfg.optim.schedule.warmup_steps = 1
    cfg.logging.tensorboard = False
    cfg.checkpoint.every_steps = 2
    cfg.export.update(export)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(run dir, result of the recipe) of a 3-step LoRA run of the embedded default, checkpoints at steps 2 and 3."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    return run_dir, run(lora_config(run_dir))


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.float().numpy()


def our_logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)), np.float32)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_the_recipe_exports_a_peft_adapter_that_peft_loads(trained):
    import transformers
    from peft import PeftModel
    run_dir, result = trained
    export = run_dir / "export"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files(export))
    base = transformers.AutoModelForCausalLM.from_pretrained(resolve_path("embedded:tiny-llama"),
                                                             dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, export).eval()
    np.testing.assert_allclose(torch_logits(peft_model), our_logits(result["model"]), atol=1e-4, rtol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(export)("abc")["input_ids"]


def test_the_cli_exports_checkpoints_as_adapters_or_merged_models(trained, tmp_path, capsys):
    import transformers
    run_dir, result = trained
    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "latest")]) == 0
    assert files(tmp_path / "latest") == files(run_dir / "export")
    assert export_main(["--checkpoint", str(run_dir / "2"), "--out", str(tmp_path / "step2")]) == 0
    step2 = files(tmp_path / "step2")
    assert step2["adapter_config.json"] == files(run_dir / "export")["adapter_config.json"]
    assert step2["adapter_model.safetensors"] != files(run_dir / "export")["adapter_model.safetensors"]

    merged = tmp_path / "merged"
    assert export_main(["--checkpoint", str(run_dir / "checkpoints" / "3"), "--out", str(merged),
                        "--merge-lora"]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files(merged))
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    np.testing.assert_allclose(torch_logits(model), our_logits(result["model"]), atol=1e-4, rtol=1e-4)

    capsys.readouterr()
    assert export_main(["--checkpoint", str(run_dir), "--out", str(merged), "--merge-lora"]) == 2
    assert f"export directory {merged} is not empty; choose another directory or pass --overwrite" in \
        capsys.readouterr().err
    assert export_main(["--checkpoint", str(run_dir), "--out", str(merged), "--overwrite"]) == 0
    assert files(merged) == files(run_dir / "export")
    assert export_main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint " + str(tmp_path / "nowhere") + " does not exist" in capsys.readouterr().err


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def test_the_training_chat_template_travels_with_every_export(tmp_path, capsys):
    import transformers
    rows = [json.loads(line) for line in Path(resolve_path("embedded:word-tasks/train")).read_text().splitlines()]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                      {"role": "assistant", "content": r["output"]}]}) + "\n"
                             for r in rows[:64]))
    cfg = lora_config(tmp_path / "run")
    cfg.train.max_steps = 2
    for split in ("train", "validation"):
        cfg.data[split].update(kind="chat", path=str(chats), chat_template=CHAT_TEMPLATE)
    base = resolve_path("embedded:tiny-llama")
    assert transformers.AutoTokenizer.from_pretrained(base).chat_template is None
    run(cfg)
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert export_main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "adapter")]) == 0
    for export in ("run/export", "adapter", "merged"):
        assert transformers.AutoTokenizer.from_pretrained(tmp_path / export).chat_template == CHAT_TEMPLATE, export
    capsys.readouterr()
    replies = []
    for model in (["--model", str(tmp_path / "merged")], ["--model", base, "--adapter", str(tmp_path / "run/export")]):
        assert generate_main([*model, "--prompt", "caps hello", "--chat", "--max-new-tokens", "4"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0].startswith("[user] caps hello\n[assistant] ") and replies[0] == replies[1], replies


def wrong_modes(root: Path, umask: int) -> list[tuple[str, str]]:
    """Paths under `root` whose mode is not the umask's default (0777 / 0666 less the umask), as transformers'."""
    want = {True: 0o777 & ~umask, False: 0o666 & ~umask}
    return [(str(p.relative_to(root.parent)), oct(p.stat().st_mode & 0o777)) for p in [root, *root.rglob("*")]
            if p.stat().st_mode & 0o777 != want[p.is_dir()]]


def test_run_dirs_and_exports_have_the_umask_default_modes(trained, tmp_path):
    run_dir, _ = trained
    umask = os.umask(0o027)
    try:
        assert not wrong_modes(run_dir, umask)  # the fixture ran under the umask it restores here
        for name, args in [("adapter", []), ("merged", ["--merge-lora"])]:
            assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / name), *args]) == 0
            assert not wrong_modes(tmp_path / name, 0o027), name
    finally:
        os.umask(umask)


def test_the_recipe_checks_export_and_checkpoint_settings_before_training(trained, tmp_path):
    run_dir, _ = trained
    with pytest.raises(FileExistsError, match="export directory .*export is not empty; set export.dir"):
        run(lora_config(run_dir))
    with pytest.raises(ConfigError, match="export.when must be one of 'final', 'never'; got 'last'"):
        run(lora_config(tmp_path, when="last"))
    cfg = lora_config(run_dir, when="never")
    cfg.peft.r = 8
    with pytest.raises(CheckpointError, match=r"checkpoints/3 was trained with LoRA r=16 but the config says r=8"):
        run(cfg)
