"""NeMo Automodel YAML recipes run as they are: recipes of the kinds the ported system ships (Llama SQuAD PEFT,
HellaSwag SFT, chat, packed sequences), written here in its schema and pointed at the offline assets, give the same
config and the same per-step losses as the equivalent Python config; bad files are one clear error naming the key."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from automodel_jax.cli import finetune as finetune_cli
from automodel_jax.config import ConfigError
from automodel_jax.config.nemo_yaml import DATASET_TARGETS, parse_nemo_yaml, yaml_config_path
from automodel_jax.recipes.llm import finetune
from automodel_jax.recipes.llm.finetune import default_config
from reference import ASSETS, STORIES

SQUAD = ASSETS / "data" / "squad" / "validation.jsonl"
HELLASWAG = ASSETS / "data" / "hellaswag" / "validation.jsonl"
ALPACA = ASSETS / "data" / "alpaca" / "alpaca_en_demo.json"
CHAT = ASSETS / "data" / "chat" / "messages_demo.jsonl"
DATASETS = "nemo_automodel.components.datasets.llm."
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}Assistant: {{ m['content'] }}"
                 "{{ eos_token }}\n{% else %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant: {% endif %}")

# The shared head of every recipe below, as the ported system's examples write it.
HEAD = f"""
step_scheduler:
  global_batch_size: 8
  local_batch_size: 4
  ckpt_every_steps: 1000
  val_every_steps: 1000
  num_epochs: 1
  max_steps: 2
dist_env:
  backend: nccl
  timeout_minutes: 1
rng:
  _target_: nemo_automodel.components.training.rng.StatefulRNG
  seed: 1111
  ranked: true
model:
  _target_: nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained
  pretrained_model_name_or_path: {STORIES}
distributed:
  _target_: nemo_automodel.components.distributed.fsdp2.FSDP2Manager
  dp_size: none
  tp_size: 1
  cp_size: 1
validation_dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  collate_fn: nemo_automodel.components.datasets.utils.default_collater
"""

SQUAD_PEFT = HEAD + f"""
peft:
  _target_: nemo_automodel.components._peft.lora.PeftConfig
  match_all_linear: True
  dim: 8
  alpha: 32
  use_triton: True
loss_fn:
  _target_: nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy
dataset:
  _target_: {DATASETS}squad.make_squad_dataset
  dataset_name: {SQUAD}
  split: train
  seq_length: 512
  limit_dataset_samples: 32
packed_sequence:
  packed_sequence_size: 0
dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  collate_fn: nemo_automodel.components.datasets.utils.default_collater
  shuffle: false
validation_dataset:
  _target_: {DATASETS}squad.make_squad_dataset
  dataset_name: {SQUAD}
  split: validation
  seq_length: 512
  limit_dataset_samples: 8
optimizer:
  _target_: torch.optim.Adam
  betas: [0.9, 0.999]
  eps: 1e-8
  lr: 1.0e-3
  weight_decay: 0
lr_scheduler:
  lr_decay_style: cosine
  lr_warmup_steps: 0
  min_lr: 1.0e-4
"""

HELLASWAG_SFT = HEAD + f"""
checkpoint:
  enabled: true
  checkpoint_dir: checkpoints/
  model_save_format: torch_save
  save_consolidated: false
loss_fn:
  _target_: nemo_automodel.components.loss.linear_ce.FusedLinearCrossEntropy
dataset:
  _target_: {DATASETS}hellaswag.HellaSwag
  path_or_dataset: {HELLASWAG}
  split: train
  num_samples_limit: 32
dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  collate_fn: nemo_automodel.components.datasets.utils.default_collater
  shuffle: true
validation_dataset:
  _target_: {DATASETS}hellaswag.HellaSwag
  path_or_dataset: {HELLASWAG}
  split: validation
  num_samples_limit: 8
optimizer:
  _target_: torch.optim.Adam
  betas: [0.9, 0.999]
  eps: 1e-8
  lr: 1.0e-4
  weight_decay: 0
"""

CHAT_PEFT = HEAD + f"""
peft:
  _target_: nemo_automodel.components._peft.lora.PeftConfig
  target_modules: ["*_proj"]
  exclude_modules: ["*o_proj"]
  dim: 4
  alpha: 16
  dropout: 0.0
dataset:
  _target_: {DATASETS}chat_dataset.ChatDataset
  path_or_dataset_id: {CHAT}
  split: train
  seq_length: 128
  limit_dataset_samples: 32
  chat_template: {json.dumps(CHAT_TEMPLATE)}
validation_dataset:
  _target_: {DATASETS}chat_dataset.ChatDataset
  path_or_dataset_id: {CHAT}
  split: validation
  seq_length: 128
  limit_dataset_samples: 8
  chat_template: {json.dumps(CHAT_TEMPLATE)}
dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  shuffle: true
optimizer:
  _target_: torch.optim.AdamW
  lr: 2.0e-3
lr_scheduler:
  lr_decay_style: linear
  lr_warmup_steps: 1
  init_lr: 0
"""

PACKED_PEFT = HEAD + f"""
peft:
  _target_: nemo_automodel.components._peft.lora.PeftConfig
  match_all_linear: true
  dim: 16
  alpha: 32
packed_sequence:
  packed_sequence_size: 128
  split_across_pack: false
dataset:
  _target_: {DATASETS}column_mapped_text_instruction_dataset.ColumnMappedTextInstructionDataset
  path_or_dataset_id: {ALPACA}
  split: train
  column_mapping:
    question: instruction
    answer: output
  seq_length: 128
  answer_only_loss_mask: true
  padding: do_not_pad
  truncation: longest_first
  limit_dataset_samples: 48
validation_dataset:
  _target_: {DATASETS}column_mapped_text_instruction_dataset.ColumnMappedTextInstructionDataset
  path_or_dataset_id: {ALPACA}
  split: validation
  column_mapping:
    question: instruction
    answer: output
  seq_length: 128
  limit_dataset_samples: 8
dataloader:
  _target_: torchdata.stateful_dataloader.StatefulDataLoader
  shuffle: true
optimizer:
  _target_: torch.optim.Adam
  lr: 5.0e-3
  weight_decay: 0.01
lr_scheduler:
  lr_decay_style: cosine
  lr_warmup_steps: 0
"""


def common(cfg, run_dir: Path) -> None:
    """What every recipe above says in our keys: batch geometry, cadence, seed, model, mesh."""
    cfg.run_dir = str(run_dir)
    cfg.seed = 1111
    cfg.train.update(global_batch_size=8, micro_batch_size=4, max_steps=2, num_epochs=1, val_every=1000)
    cfg.checkpoint.every_steps = 1000
    cfg.distributed.timeout_s = 60
    cfg.model.path = str(STORIES)
    cfg.mesh.update(fsdp=-1, tensor=1, context=1)


def dataset(cfg, split: str, kind: str, path: Path, limit: int, **keys) -> None:
    cfg.data[split].update(kind=kind, path=str(path), split=split, limit=limit, **keys)


def squad_python(run_dir: Path):
    cfg = default_config()
    common(cfg, run_dir)
    cfg.peft.update(method="lora", target_modules=("all-linear",), r=8, alpha=32.0)
    cfg.loss.impl = "naive"
    dataset(cfg, "train", "squad", SQUAD, 32)
    dataset(cfg, "validation", "squad", SQUAD, 8)
    cfg.data.update(seq_len=512, shuffle=False)
    cfg.optim.update(name="adam", learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    cfg.optim.schedule.update(name="cosine", warmup_steps=0, min_learning_rate=1e-4)
    return cfg


def hellaswag_python(run_dir: Path):
    cfg = default_config()
    common(cfg, run_dir)
    cfg.peft.method = "none"
    cfg.loss.impl = "chunked"
    dataset(cfg, "train", "hellaswag", HELLASWAG, 32)
    dataset(cfg, "validation", "hellaswag", HELLASWAG, 8)
    cfg.data.shuffle = True
    cfg.optim.update(name="adam", learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    cfg.optim.schedule.update(name="constant", warmup_steps=0)
    return cfg


def chat_python(run_dir: Path):
    cfg = default_config()
    common(cfg, run_dir)
    cfg.peft.update(method="lora", target_modules=("*_proj",), exclude_modules=("*o_proj",), r=4, alpha=16.0,
                    dropout=0.0)
    cfg.loss.impl = "naive"  # their default loss_fn: MaskedCrossEntropy
    dataset(cfg, "train", "chat", CHAT, 32, chat_template=CHAT_TEMPLATE)
    dataset(cfg, "validation", "chat", CHAT, 8, chat_template=CHAT_TEMPLATE)
    cfg.data.update(seq_len=128, shuffle=True)
    # torch.optim.AdamW's defaults for what the file leaves out (weight decay 0.01); min_lr defaults to lr / 100
    cfg.optim.update(name="adamw", learning_rate=2e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    cfg.optim.schedule.update(name="linear", warmup_steps=1, min_learning_rate=2e-3 * 0.01)
    return cfg


def packed_python(run_dir: Path):
    cfg = default_config()
    common(cfg, run_dir)
    cfg.peft.update(method="lora", target_modules=("all-linear",), r=16, alpha=32.0)
    cfg.loss.impl = "naive"
    columns = dict(question="instruction", answer="output")
    dataset(cfg, "train", "instruction", ALPACA, 48)
    dataset(cfg, "validation", "instruction", ALPACA, 8)
    for split in ("train", "validation"):
        cfg.data[split].columns = columns
    cfg.data.update(seq_len=128, packing=True, shuffle=True)
    cfg.optim.update(name="adam", learning_rate=5e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    cfg.optim.schedule.update(name="cosine", warmup_steps=0, min_learning_rate=5e-3 * 0.01)
    return cfg


RECIPES = {"squad_peft": (SQUAD_PEFT, squad_python), "hellaswag_sft": (HELLASWAG_SFT, hellaswag_python),
           "chat_peft": (CHAT_PEFT, chat_python), "packed_peft": (PACKED_PEFT, packed_python)}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Runs write under tmp_path (a relative checkpoint_dir included); main()'s logging setup is undone after."""
    monkeypatch.chdir(tmp_path)
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def translate(tmp_path: Path, text: str, *overrides: str):
    return parse_nemo_yaml(["--config", write(tmp_path, text), *overrides], default_config())


def train_losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_translates_to_the_equivalent_python_config(tmp_path, name):
    text, python_config = RECIPES[name]
    cfg, translation = translate(tmp_path, text, f"--checkpoint.checkpoint_dir={tmp_path / 'run'}")
    expected = python_config(tmp_path / "run")
    assert cfg.to_dict() == expected.to_dict()
    assert ("step_scheduler.local_batch_size", "train.micro_batch_size", 4) in translation.mapping
    assert "rng.ranked is ignored: one seed drives every process here" in translation.warnings


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_to_the_same_losses_as_the_python_config(tmp_path, name):
    text, python_config = RECIPES[name]
    cfg, _ = translate(tmp_path, text, "--checkpoint.checkpoint_dir", str(tmp_path / "yaml"))
    expected = python_config(tmp_path / "python")
    expected.run_dir = str(tmp_path / "python")
    for config in (cfg, expected):
        config.train.log_every = 1
        config.logging.tensorboard = False
        finetune.run(config)
    yaml_losses, python_losses = train_losses(tmp_path / "yaml"), train_losses(tmp_path / "python")
    assert sorted(yaml_losses) == [1, 2]
    assert yaml_losses == python_losses


@pytest.mark.slow
def test_cli_runs_a_yaml_recipe_with_overrides_prints_the_mapping_and_saves_our_config(tmp_path):
    path = write(tmp_path, SQUAD_PEFT)
    argv = ["--config", path, "--step_scheduler.max_steps", "1", "--optimizer.lr=2e-3",
            f"--checkpoint.checkpoint_dir={tmp_path / 'run'}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "automodel_jax.finetune", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step_scheduler.max_steps" in done.stdout and "-> train.max_steps = 1" in done.stdout
    assert "optimizer.lr" in done.stdout and "-> optim.learning_rate = 0.002" in done.stdout
    assert "warning: peft.use_triton is ignored: LoRA runs through XLA here" in done.stderr.splitlines()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["train"]["max_steps"], saved["optim"]["learning_rate"], saved["peft"]["r"]) == (1, 2e-3, 8)
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


def test_overrides_in_both_forms_and_new_keys(tmp_path):
    cfg, translation = translate(tmp_path, SQUAD_PEFT, "--step_scheduler.max_steps", "10", "--peft.dim=16",
                                 "--validation_dataset.limit_dataset_samples", "4", "--optimizer.betas=[0.8, 0.95]")
    assert (cfg.train.max_steps, cfg.peft.r, cfg.data.validation.limit) == (10, 16, 4)
    assert (cfg.optim.b1, cfg.optim.b2) == (0.8, 0.95)
    assert ("peft.dim", "peft.r", 16) in translation.mapping


def test_defaults_the_file_leaves_out_are_the_ported_systems(tmp_path):
    """No lr_scheduler section: a constant LR; no loss_fn: masked CE; AdamW without weight_decay: torch's 0.01;
    no dataloader.shuffle: torch's unshuffled order; no peft section: full SFT."""
    text = HELLASWAG_SFT.replace("  shuffle: true\n", "").replace("torch.optim.Adam\n", "torch.optim.AdamW\n")
    text = text.replace("loss_fn:\n  _target_: nemo_automodel.components.loss.linear_ce.FusedLinearCrossEntropy\n",
                        "")
    text = text.replace("  weight_decay: 0\n", "")
    cfg, _ = translate(tmp_path, text)
    assert (cfg.optim.schedule.name, cfg.optim.schedule.warmup_steps) == ("constant", 0)
    assert (cfg.loss.impl, cfg.optim.name, cfg.optim.weight_decay) == ("naive", "adamw", 0.01)
    assert (cfg.data.shuffle, cfg.peft.method) == (False, "none")


def test_each_setting_without_effect_is_one_warning(tmp_path):
    _, translation = translate(tmp_path, HELLASWAG_SFT)
    assert sorted(translation.warnings) == sorted([
        "rng.ranked is ignored: one seed drives every process here",
        "dist_env.backend is ignored: processes talk through jax.distributed",
        "validation_dataloader is ignored: validation batches are micro_batch_size x data-parallel rows",
        "checkpoint.model_save_format is ignored: checkpoints are Orbax; the export is safetensors",
        "checkpoint.save_consolidated is ignored: the export is one consolidated safetensors model",
        "no dataset sets seq_length: samples are cut at data.seq_len=512 (override with --dataset.seq_length N)",
    ])


@pytest.mark.parametrize("overrides, fragments", [
    (["--dataset._target_=my_module.MyDataset"],
     ["dataset._target_ 'my_module.MyDataset' is not supported", "nothing from the file is imported",
      *DATASET_TARGETS]),
    (["--optimizer._target_=torch.optim.SGD"], ["optimizer._target_ 'torch.optim.SGD'", "torch.optim.AdamW"]),
    (["--loss_fn._target_=os.system"], ["loss_fn._target_ 'os.system' is not supported", "MaskedCrossEntropy"]),
    (["--peft.lora_A_init=kaiming"], ["peft.lora_A_init has no equivalent", "would change results"]),
    (["--peft.dimm=4"], ["peft.dimm has no equivalent", "did you mean 'dim'?"]),
    (["--optimizer.amsgrad=true"], ["optimizer.amsgrad: true is not supported"]),
    (["--distributed.pp_size=2"], ["distributed.pp_size=2 is not supported"]),
    (["--packed_sequence.split_across_pack=true", "--packed_sequence.packed_sequence_size=512"],
     ["packed_sequence.split_across_pack: true is not supported"]),
    (["--model.trust_remote_code=true"], ["model.trust_remote_code: true is refused"]),
    (["--lr_scheduler.lr_decay_style=inverse-square-root"], ["lr_decay_style 'inverse-square-root'", "cosine"]),
    (["--lr_scheduler.lr_warmup_steps=null"], ["lr_scheduler.lr_warmup_steps must be a number"]),
    (["--quantization.enabled=true"], ["section(s) quantization have no equivalent"]),
    (["--validation_dataset.seq_length=256"], ["different seq_length"]),
    (["--optimizer.lr=fast"], ["optimizer.lr must be a number, got 'fast'"]),
    (["--step_scheduler.max_steps.value=3"], ["'step_scheduler.max_steps' is a value, not a section"]),
])
def test_bad_recipes_are_one_clear_error_naming_the_key(tmp_path, overrides, fragments):
    with pytest.raises(ConfigError) as caught:
        translate(tmp_path, SQUAD_PEFT, *overrides)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_warmup_steps_follow_max_steps_or_are_an_error_saying_how_to_set_them(tmp_path):
    """The ported system's default warmup, min(1000, total_steps // 10), from step_scheduler.max_steps when it is set
    (their shipped SQuAD PEFT recipe gives none); without max_steps the length depends on the data: an error."""
    recipe = SQUAD_PEFT.replace("  lr_warmup_steps: 0\n", "")
    cfg, _ = translate(tmp_path, recipe, "--step_scheduler.max_steps", "250")
    assert (cfg.train.max_steps, cfg.optim.schedule.warmup_steps) == (250, 25)
    cfg, _ = translate(tmp_path, recipe, "--step_scheduler.max_steps", "50000")
    assert cfg.optim.schedule.warmup_steps == 1000
    no_max_steps = "\n".join(line for line in recipe.splitlines() if "max_steps" not in line) + "\n"
    with pytest.raises(ConfigError, match=r"lr_scheduler.lr_warmup_steps is missing and step_scheduler.max_steps is "
                                          r"not set.*--lr_scheduler.lr_warmup_steps N"):
        translate(tmp_path, no_max_steps)


def test_yaml_is_data_only(tmp_path):
    """A Python tag is not constructed (safe loader): the file is refused before anything runs."""
    text = "model: !!python/object/apply:os.system ['touch pwned']\n"
    with pytest.raises(ConfigError, match="is not valid YAML"):
        translate(tmp_path, text)
    assert not (tmp_path / "pwned").exists()


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    path = write(tmp_path, SQUAD_PEFT)
    assert finetune_cli.main(["--config", path, "--peft.dimm", "4"]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "peft.dimm has no equivalent" in line
    assert not (tmp_path / "checkpoints").exists()


def test_only_yaml_configs_are_translated():
    assert yaml_config_path(["--config", "r.yaml"]) == "r.yaml"
    assert yaml_config_path(["--config=r.YML", "--a.b=1"]) == "r.YML"
    assert yaml_config_path(["-c", "r.yaml"]) == "r.yaml"
    assert yaml_config_path(["--config", "configs/llama_lora.py:llama3.2-1b"]) is None


def test_mock_dataset_and_negative_override_values(tmp_path):
    mock = (f"  _target_: {DATASETS}mock.build_unpacked_dataset\n  num_sentences: 64\n  vocab_size: 100\n"
            "  seed: 3\n")
    text = SQUAD_PEFT.replace(f"  _target_: {DATASETS}squad.make_squad_dataset\n  dataset_name: {SQUAD}\n"
                              "  split: train\n  seq_length: 512\n  limit_dataset_samples: 32\n", mock)
    cfg, translation = translate(tmp_path, text, "--distributed.dp_size", "-1")
    assert (cfg.data.train.kind, cfg.data.train.num_samples, cfg.data.train.vocab_size) == ("mock", 64, 100)
    assert cfg.data.train.seed == 3 and cfg.mesh.fsdp == -1
    with pytest.raises(ConfigError, match="dataset.mean_len has no equivalent"):
        translate(tmp_path, text, "--dataset.mean_len=12")


FP8 = """
compile:
  enabled: true
fp8:
  enabled: true
  recipe_name: tensorwise
  enable_fsdp_float8_all_gather: true
  precompute_float8_dynamic_scale_for_fsdp: true
  force_recompute_fp8_weight_in_bwd: true
  filter_fqns: ["lm_head", "down_proj"]
  emulate: true
"""


def test_the_fp8_section_translates_to_model_fp8(tmp_path):
    """The ported system's llama_3_2_1b_hellaswag_fp8 section: its switches map to model.fp8, its FSDP and
    recompute settings (speed and memory only) are one warning each, and a recipe other than tensorwise is refused."""
    cfg, translation = translate(tmp_path, HELLASWAG_SFT + FP8)
    assert cfg.model.fp8.to_dict() == dict(enabled=True, recipe="tensorwise", amax_history_len=1024,
                                           filter_modules=("lm_head", "down_proj"), emulate=True)
    assert {w for w in translation.warnings if w.startswith(("fp8", "compile"))} == {
        "compile is ignored: XLA compiles every step",
        "fp8.enable_fsdp_float8_all_gather is ignored: XLA chooses how sharded weights are gathered",
        "fp8.precompute_float8_dynamic_scale_for_fsdp is ignored: XLA chooses how sharded weights are gathered",
        "fp8.force_recompute_fp8_weight_in_bwd is ignored: the backward reuses the forward's FP8 weight here"}
    for recipe in ("rowwise", "delayed"):  # delayed is not a NeMo recipe name: the error says where it is chosen
        with pytest.raises(ConfigError, match=rf"^fp8.recipe_name '{recipe}' is not supported; supported: tensorwise "
                                              r"\(delayed scaling, .* is model.fp8.recipe=delayed in a Python config\)$"):
            translate(tmp_path, HELLASWAG_SFT + FP8, f"--fp8.recipe_name={recipe}")
