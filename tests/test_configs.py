"""The shipped config files (configs/*.py): every preset loads through the command-line parser with the intended model
and method, LoRA targets fit each family's real layer names, and mistakes on the command line are one-line errors."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import transformers

from automodel_jax import finetune
from automodel_jax.config import load_config_file, parse_config
from automodel_jax import AutoModelForCausalLM
from automodel_jax.peft.lora import find_targets
from reference import FAMILIES, TINY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SEPARATE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
FUSED = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}

# (file, preset) -> (model.path, peft.method); "" is each file's default.
EXPECTED = {
    ("llama_lora.py", ""): ("embedded:tiny-llama", "lora"),
    ("llama_lora.py", "llama3.2-1b"): ("meta-llama/Llama-3.2-1B", "lora"),
    ("llama_lora.py", "llama3.1-8b"): ("meta-llama/Llama-3.1-8B", "lora"),
    ("llama_sft.py", ""): ("embedded:tiny-llama", "none"),
    ("llama_sft.py", "llama3.2-1b"): ("meta-llama/Llama-3.2-1B", "none"),
    ("llama_sft.py", "llama3.1-8b"): ("meta-llama/Llama-3.1-8B", "none"),
    ("llama_sft.py", "llama3.2-1b-hellaswag-fp8"): ("meta-llama/Llama-3.2-1B", "none"),
    ("qwen2_lora.py", ""): ("Qwen/Qwen2.5-0.5B-Instruct", "lora"),
    ("qwen2_lora.py", "qwen2.5-0.5b"): ("Qwen/Qwen2.5-0.5B-Instruct", "lora"),
    ("qwen3_lora.py", ""): ("Qwen/Qwen3-0.6B", "lora"),
    ("qwen3_lora.py", "qwen3-0.6b"): ("Qwen/Qwen3-0.6B", "lora"),
    ("mistral_lora.py", ""): ("mistralai/Mistral-7B-Instruct-v0.3", "lora"),
    ("mistral_lora.py", "mistral-7b"): ("mistralai/Mistral-7B-Instruct-v0.3", "lora"),
    ("gemma2_lora.py", ""): ("google/gemma-2-2b-it", "lora"),
    ("gemma2_lora.py", "gemma2-2b"): ("google/gemma-2-2b-it", "lora"),
    ("gemma3_lora.py", ""): ("google/gemma-3-1b-it", "lora"),
    ("gemma3_lora.py", "gemma3-1b"): ("google/gemma-3-1b-it", "lora"),
    ("phi3_lora.py", ""): ("microsoft/Phi-3-mini-4k-instruct", "lora"),
    ("phi3_lora.py", "phi3-mini-4k"): ("microsoft/Phi-3-mini-4k-instruct", "lora"),
}
# The VLM recipe's config files: (file, preset) -> (model.path, peft.method).
EXPECTED_VLM = {
    ("gemma3_vl_lora.py", ""): ("embedded:tiny-gemma3", "lora"),
    ("gemma3_vl_lora.py", "gemma3-4b"): ("google/gemma-3-4b-it", "lora"),
    ("qwen2_5_vl_lora.py", ""): ("embedded:tiny-qwen2_5_vl", "lora"),
    ("qwen2_5_vl_lora.py", "qwen2.5-vl-3b"): ("Qwen/Qwen2.5-VL-3B-Instruct", "lora"),
}
# family config -> (tiny HF config of that family: config class and overrides, layer names LoRA must adapt)
FAMILY_MODELS = {
    "llama_lora.py": ("LlamaConfig", {}, SEPARATE),
    "qwen2_lora.py": FAMILIES["qwen2_tied"][1:] + (SEPARATE,),
    "qwen3_lora.py": FAMILIES["qwen3"][1:] + (SEPARATE,),
    "mistral_lora.py": FAMILIES["mistral_sliding"][1:] + (SEPARATE,),
    "gemma2_lora.py": FAMILIES["gemma2"][1:] + (SEPARATE,),
    "gemma3_lora.py": FAMILIES["gemma3"][1:] + (SEPARATE,),
    "phi3_lora.py": FAMILIES["phi3_sliding_partial_rope"][1:] + (FUSED,),
}


def spec(file: str, preset: str = "") -> str:
    return str(CONFIGS / file) + (f":{preset}" if preset else "")


def presets_of(file: str) -> list[str]:
    return [preset for f, preset in {**EXPECTED, **EXPECTED_VLM} if f == file]


def declared_presets(file: str) -> tuple[str, ...]:
    module_spec = importlib.util.spec_from_file_location(file.removesuffix(".py"), CONFIGS / file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.PRESETS


def test_every_config_file_and_preset_is_covered():
    on_disk = {path.name for path in CONFIGS.glob("*.py")}
    assert on_disk == {file for file, _ in {**EXPECTED, **EXPECTED_VLM}}
    for file in on_disk:
        assert set(presets_of(file)) == set(declared_presets(file)), file


@pytest.mark.parametrize(("file", "preset"), sorted(EXPECTED))
def test_preset_loads_with_its_model_and_method(file, preset):
    cfg = parse_config(["--config", spec(file, preset)])
    path, method = EXPECTED[(file, preset)]
    assert (cfg.model.path, cfg.peft.method) == (path, method)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    assert cfg.train.max_steps > 0 and cfg.data.seq_len > 0
    if path.startswith("embedded:"):  # the CPU default: float32, the project's word tasks
        assert (cfg.model.dtype, cfg.model.param_dtype) == ("float32", "float32")
        assert cfg.data.train.path == "embedded:word-tasks/train"
    else:  # real models: bfloat16 compute over float32 weights, SQuAD (HellaSwag for the FP8 preset) from the Hub
        assert (cfg.model.dtype, cfg.model.param_dtype) == ("bfloat16", "float32")
        kind = "hellaswag" if preset.endswith("hellaswag-fp8") else "squad"
        assert (cfg.data.train.kind, cfg.data.train.split, cfg.data.validation.split) == (kind, "train",
                                                                                          "validation")
        assert cfg.model.fp8.enabled == preset.endswith("fp8")
        assert cfg.optim.learning_rate == 1e-5 and cfg.optim.schedule.min_learning_rate == pytest.approx(1e-6)


@pytest.mark.parametrize(("file", "preset"), sorted(EXPECTED_VLM))
def test_vlm_preset_loads_the_vlm_recipe_with_its_model(file, preset):
    cfg = parse_config(["--config", spec(file, preset)])
    assert cfg.vlm and (cfg.model.path, cfg.peft.method) == EXPECTED_VLM[(file, preset)]
    assert cfg.model.freeze_vision_tower and cfg.model.freeze_embeddings and not cfg.model.freeze_language_model
    if preset:  # the published model on CORD-v2 receipts, bf16
        assert cfg.model.dtype == "bfloat16" and cfg.data.train.kind == cfg.data.validation.kind == "cord"
    else:  # the CPU default on the rendered shapes task
        assert cfg.model.dtype == "float32" and cfg.data.train.path == "embedded:shapes/train"


@pytest.mark.parametrize("file", sorted({file for file, _ in EXPECTED_VLM}))
def test_vlm_lora_targets_only_the_language_model_by_default(file):
    from automodel_jax.models.base import build_model
    from automodel_jax.recipes.vlm import embedded
    from automodel_jax.recipes.vlm.finetune import frozen_module_patterns
    cfg = load_config_file(spec(file))
    model_type = "gemma3" if file.startswith("gemma3") else "qwen2_5_vl"
    info = dict(model_type=model_type, vocab_size=300, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                image_token_index=10, boi_token_index=11, eoi_token_index=12, mm_tokens_per_image=4, image_size=32,
                image_token_id=10, video_token_id=13, vision_start_token_id=11, vision_end_token_id=12,
                patch_size=4, temporal_patch_size=2, spatial_merge_size=2)
    model = build_model(embedded.tiny_hf_config(info))
    targets = find_targets(model, cfg.peft.target_modules,
                           tuple(cfg.peft.exclude_modules) + frozen_module_patterns(model_type, cfg))
    language = "language_model." if model_type == "gemma3" else "model."
    assert targets and all(t.startswith(language) for t in targets)
    assert {t.rsplit(".", 1)[-1] for t in targets} == SEPARATE


def test_every_preset_of_a_file_gets_its_own_run_dir():
    for file in {file for file, _ in {**EXPECTED, **EXPECTED_VLM}}:
        named = [preset for preset in presets_of(file) if preset]
        run_dirs = [parse_config(["--config", spec(file, preset)]).run_dir for preset in named]
        assert len(set(run_dirs)) == len(run_dirs), file


def test_sft_presets_train_every_weight_with_adamw():
    for preset in ("llama3.2-1b", "llama3.1-8b"):
        cfg = parse_config(["--config", spec("llama_sft.py", preset)])
        assert cfg.optim.name == "adamw" and cfg.optim.schedule.name == "cosine"
    big = parse_config(["--config", spec("llama_sft.py", "llama3.2-1b")])
    assert (big.train.global_batch_size, big.train.micro_batch_size) == (64, 8)  # NeMo's llama3_2_1b_squad


@pytest.mark.parametrize("file", sorted(FAMILY_MODELS))
def test_lora_targets_adapt_every_projection_of_the_family(file):
    config_class, overrides, layer_names = FAMILY_MODELS[file]
    hf_config = getattr(transformers, config_class)(**{**TINY, **overrides}).to_dict()
    model = AutoModelForCausalLM.from_config(hf_config)
    for preset in presets_of(file):
        cfg = load_config_file(spec(file, preset))
        targets = find_targets(model, cfg.peft.target_modules, cfg.peft.exclude_modules)
        assert {name.rsplit(".", 1)[-1] for name in targets} == layer_names, preset
        assert len(targets) == len(layer_names) * hf_config["num_hidden_layers"], preset


def test_overrides_apply_on_top_of_a_preset():
    cfg = parse_config(["--config", spec("qwen2_lora.py", "qwen2.5-0.5b"), "--config.peft.r=16",
                        "--config.model.path", "/models/qwen", "--config.train.max_steps=5"])
    assert (cfg.peft.r, cfg.model.path, cfg.train.max_steps) == (16, "/models/qwen", 5)
    assert cfg.peft.alpha == 32.0  # untouched keys keep the preset's values


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--config", spec("llama_lora.py"), "--config.optim.learning_rat=1e-4"],
     ["unknown config key 'optim.learning_rat'", "did you mean 'optim.learning_rate'?"]),
    (["--config", spec("llama_sft.py"), "--config.train.max_steps=ten"],
     ["config key 'train.max_steps' expects int", "got 'ten'"]),
    (["--config", spec("qwen2_lora.py", "qwen9")], ["unknown preset 'qwen9'", "qwen2_lora.py", "qwen2.5-0.5b"]),
    (["--config", "nonexistent.py"], ["config file 'nonexistent.py' not found"]),
    # A key only the other recipe has is said so (FP8 and packing are the LLM recipe's), not a did-you-mean.
    (["--config", spec("qwen2_5_vl_lora.py"), "--config.model.fp8.enabled=true"],
     ["config key 'model.fp8.enabled' is one of the LLM recipe's", "runs the VLM recipe",
      "remove --config.model.fp8.enabled, or use an LLM config file"]),
    (["--config", spec("gemma3_vl_lora.py"), "--config.data.packing=true"],
     ["config key 'data.packing' is one of the LLM recipe's", "runs the VLM recipe"]),
    (["--config", spec("llama_lora.py"), "--config.model.freeze_vision_tower=true"],
     ["config key 'model.freeze_vision_tower' is one of the VLM recipe's", "use a VLM config file"]),
    (["--config", spec("qwen2_5_vl_lora.py"), "--config.vlm=false"],
     ["vlm marks a config of the vision-language recipe and is not a switch", "use an LLM config file"]),
])
def test_command_line_mistakes_exit_2_with_one_error_line(argv, fragments, capsys):
    assert finetune.main(argv) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert all(fragment in line for fragment in fragments), line
