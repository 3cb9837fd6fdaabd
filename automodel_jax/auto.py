"""The facade: `AutoModelForCausalLM` and `AutoModelForImageTextToText` (HF-shaped, pick a family by `model_type`),
`save_pretrained`, and loading a model with its tokenizer (or a VLM with its processor) and adapter for inference. The
one place that composes models with checkpoint I/O."""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import transformers

from automodel_jax.checkpoint.hf import load_pretrained, read_hf_config, resolve_checkpoint_dir, save_pretrained
from automodel_jax.checkpoint.peft_io import load_peft_adapter
from automodel_jax.data.encoding import check_vocabulary
from automodel_jax.data.vlm import MODEL_TYPES as VLM_MODEL_TYPES, load_processor
from automodel_jax.models.base import CausalLM, build_model
from automodel_jax.models.vocab import substituted_token_ids

__all__ = ["AutoModelForCausalLM", "AutoModelForImageTextToText", "find_checkpoint_dir", "load_for_inference",
           "load_processor", "load_vlm_for_inference", "save_pretrained"]


def _dtype(x):
    return jnp.dtype(x) if x is not None else None


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(path, *, dtype=jnp.float32, param_dtype=None, mesh=None, **model_overrides) -> CausalLM:
        """Load a local HF checkpoint directory or Hub name. `dtype` is the compute dtype, `param_dtype` the storage
        dtype (default: same as dtype); `mesh` shards the parameters (None = one device); overrides such as
        remat="full" or attention_impl="xla" replace fields of the family's config."""
        dtype = _dtype(dtype)
        return load_pretrained(path, dtype=dtype, param_dtype=_dtype(param_dtype) or dtype, mesh=mesh,
                               model_overrides=model_overrides or None)

    @staticmethod
    def from_config(hf_config: dict, *, dtype=jnp.float32, param_dtype=None, seed: int = 0,
                    **model_overrides) -> CausalLM:
        """A randomly initialised model for an HF config dict (for pre-training from scratch and benchmarks)."""
        dtype = _dtype(dtype)
        return build_model(hf_config, dtype=dtype, param_dtype=_dtype(param_dtype) or dtype, seed=seed,
                           **model_overrides)

    save_pretrained = staticmethod(save_pretrained)


def _require_vlm(hf_config: dict, where) -> None:
    model_type = hf_config.get("model_type")
    if model_type not in VLM_MODEL_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not a vision-language model; "
                         f"AutoModelForImageTextToText supports {', '.join(VLM_MODEL_TYPES)} (load text models with "
                         f"AutoModelForCausalLM)")


class AutoModelForImageTextToText:
    """Vision-language models (Gemma 3, Qwen2.5-VL), as transformers' AutoModelForImageTextToText; the model is called
    with the processor's outputs (`model(input_ids, attention_mask, pixel_values=..., token_type_ids=... or
    image_grid_thw=...)`), and its processor comes from `load_processor(directory)`."""

    @staticmethod
    def from_pretrained(path, *, dtype=jnp.float32, param_dtype=None, mesh=None, **model_overrides) -> CausalLM:
        """Load a local HF VLM checkpoint directory or Hub name (arguments as AutoModelForCausalLM.from_pretrained).
        ValueError naming the supported model types when config.json's model_type is not a VLM's."""
        directory = resolve_checkpoint_dir(path)
        _require_vlm(read_hf_config(directory), directory / "config.json")
        return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                                                    **model_overrides)

    @staticmethod
    def from_config(hf_config: dict, *, dtype=jnp.float32, param_dtype=None, seed: int = 0,
                    **model_overrides) -> CausalLM:
        """A randomly initialised VLM for an HF config dict (Gemma3Config / Qwen2_5_VLConfig `to_dict()`)."""
        _require_vlm(hf_config, "hf_config")
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, param_dtype=param_dtype, seed=seed,
                                                **model_overrides)

    save_pretrained = staticmethod(save_pretrained)


def _is_hf_checkpoint(directory: Path) -> bool:
    config = directory / "config.json"
    if not config.is_file() or not any((directory / f).is_file()
                                       for f in ("model.safetensors", "model.safetensors.index.json")):
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except json.JSONDecodeError:
        return False


def find_checkpoint_dir(path) -> Path | str:
    """An HF checkpoint directory as given; a run directory: the newest HF checkpoint under it; else `path` unchanged
    (a Hub name, or a path the checkpoint loader reports as missing)."""
    local = Path(path).expanduser()
    if not local.is_dir() or _is_hf_checkpoint(local):
        return local if local.is_dir() else path
    found = sorted((c.parent for c in local.rglob("config.json") if _is_hf_checkpoint(c.parent)),
                   key=lambda d: d.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{path} is neither an HF checkpoint directory (config.json with model_type and "
                                f"safetensors weights) nor a run directory containing one; {_model_hint(local)}")
    return found[-1]


def _model_hint(run_dir: Path) -> str:
    """What to pass instead of a directory without an HF checkpoint: a LoRA run's adapter with its base model, or
    exporting the run's checkpoints first."""
    adapters = sorted(run_dir.rglob("adapter_config.json"), key=lambda f: f.stat().st_mtime)
    if adapters:
        try:
            base = json.loads(adapters[-1].read_text()).get("base_model_name_or_path") or "BASE_MODEL"
        except json.JSONDecodeError:
            base = "BASE_MODEL"
        return (f"it is a LoRA run whose export {adapters[-1].parent} is a PEFT adapter: pass --model {base} "
                f"--adapter {adapters[-1].parent}")
    if (run_dir / "checkpoints").is_dir():
        return (f"export its checkpoint first (python -m automodel_jax.export --checkpoint {run_dir} --out DIR, "
                "with --merge-lora for a LoRA run) and pass that directory")
    return "pass the exported checkpoint directory"


def load_for_inference(model_path, adapter=None, *, dtype: str = "float32", mesh=None):
    """(model, tokenizer) from an HF checkpoint or run directory, with an optional PEFT adapter put into it; the
    parameters, adapter included, are sharded over `mesh` (None = one device). The tokenizer is the adapter's when it
    has one (ours carry the chat template they were trained with), else the model's. DataError (a ValueError) when
    the tokenizer has token ids outside the model's embedding table."""
    directory = find_checkpoint_dir(model_path)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, mesh=mesh)
    source = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() \
        else model.hf_source.directory
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{source}: no usable tokenizer ({type(e).__name__}); the checkpoint directory "
                                "needs its tokenizer files (tokenizer.json or tokenizer.model)")
    check_vocabulary(tokenizer, model.config.vocab_size)
    if adapter is not None:
        load_peft_adapter(model, adapter)
    return model, tokenizer


def load_vlm_for_inference(model_path, adapter=None, *, dtype: str = "float32", mesh=None):
    """(model, processor) of a VLM checkpoint or run directory, with an optional PEFT adapter put into it (sharded
    over `mesh` as in load_for_inference).

    ValueError for a text-only model_type, a directory without processor files (processor_config.json or
    preprocessor_config.json with the tokenizer), or a tokenizer with token ids outside the embedding table."""
    directory = find_checkpoint_dir(model_path)
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype, mesh=mesh)
    processor = load_processor(model.hf_source.directory)
    check_vocabulary(processor.tokenizer, model.config.vocab_size, exempt=substituted_token_ids(model.config))
    if adapter is not None:
        load_peft_adapter(model, adapter)
    return model, processor
