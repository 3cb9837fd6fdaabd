"""LoRA adapters in Hugging Face PEFT's format, the one `peft.PeftModel.from_pretrained(base, dir)` reads.

adapter_model.safetensors holds `base_model.model.<module path>.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r] (torch layout: our lora_a [in, r] and lora_b [r, out] transposed); adapter_config.json holds r, lora_alpha
and the targets as full module paths, so PEFT adapts exactly the layers we did.

A scanned model's stacked adapters (lora_a [L, in, r]) are written and read as one adapter per layer under the
per-layer names (`layers.layer_names`), so the files are those of the unrolled model.

PEFT names modules after transformers' runtime module tree, which for VLMs differs from our (checkpoint) tree:
`PEFT_MODULE_NAMES` maps one to the other by model_type (text models: the same names).
"""
from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from automodel_jax.checkpoint.hf import commit_output_dir, copy_tokenizer_files, host_array, prepare_output_dir
from automodel_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFile, write_file
from automodel_jax.models.layers import Linear, LoRAParam, layer_names
from automodel_jax.models.params import path_str
from automodel_jax.parallel.sharding import DEFAULT_RULES, param_shardings, params_mesh
from automodel_jax.peft.lora import adapters, apply_lora, linear_modules, lora_settings, unadaptable_modules

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# A LoRA factor, or (factor None) the weight of an adapted layer that PEFT saves with adapters on an output or input
# embedding (`save_embedding_layers`, e.g. LoRA on lm_head): it replaces the base model's weight when loaded.
PEFT_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?:lora_(?P<factor>[AB])(?:\.default)?|base_layer)\.weight")
# PEFT options that change the adapter's maths beyond plain LoRA, with the value that keeps it plain.
PLAIN_LORA = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "lora_bias": False}
# Our module path prefix -> the name PEFT gives it on transformers' model, by model_type; a prefix ending in "." renames
# the modules under it, one without renames that module. Names no prefix matches are the same in both.
PEFT_MODULE_NAMES = {
    "gemma3": (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")),
    "qwen2_5_vl": (("visual.", "model.visual."), ("model.", "model.language_model."), ("lm_head", "lm_head")),
}
# Our Linear layers that transformers holds as a bare parameter, which a PEFT LoRA adapter cannot target.
NOT_PEFT_LINEAR = {"gemma3": ("multi_modal_projector.mm_input_projection_weight",)}


def peft_key(module: str, factor: str) -> str:
    return f"base_model.model.{module}.lora_{factor}.weight"


def model_type_of(model: nnx.Module) -> str | None:
    """The HF model_type the model was built from (None when it has no HF config)."""
    config = model.hf_source.config_json
    return json.loads(config).get("model_type") if config else None


def _rename(name: str, pairs) -> str:
    for source, target in pairs:
        if source.endswith(".") and name.startswith(source):
            return target + name[len(source):]
        if name == source:
            return target
    return name


def to_peft_name(module: str, model_type: str | None) -> str:
    """Our module path -> PEFT's name for it on the transformers model of `model_type`."""
    return _rename(module, PEFT_MODULE_NAMES.get(model_type, ()))


def from_peft_name(module: str, model_type: str | None) -> str:
    """PEFT's module name (transformers' runtime tree, or our checkpoint tree as it is) -> our module path."""
    return _rename(module, [(t, s) for s, t in PEFT_MODULE_NAMES.get(model_type, ())])


def save_peft_adapter(model: nnx.Module, out_dir, base_model_name_or_path: str, overwrite: bool = False,
                      chat_template: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter directory (with the base model's tokenizer and processor
    files, `chat_template` replacing theirs: see hf.copy_tokenizer_files). Module names are PEFT's (`to_peft_name`); ValueError for an adapter PEFT cannot hold (see NOT_PEFT_LINEAR).

    Atomic (a temporary sibling renamed when complete); a non-empty out_dir is refused unless overwrite. Every
    process must call it (adapters are gathered); process 0 writes.
    """
    adapted = adapters(model)
    if not adapted:
        raise ValueError("the model has no LoRA adapters; export the full model with save_pretrained instead")
    settings, model_type = lora_settings(model), model_type_of(model)
    bare = [m for m in adapted if m in NOT_PEFT_LINEAR.get(model_type, ())]
    if bare:
        raise ValueError(f"{bare[0]} has a LoRA adapter, but transformers holds it as a bare parameter that a PEFT "
                         f"adapter cannot target; export with merge_lora (--merge-lora) or exclude it from "
                         f"peft.target_modules")
    primary = jax.process_index() == 0
    name = functools.partial(to_peft_name, model_type=model_type)
    host = {peft_key(name(m), "A"): host_array(a).T for m, (a, _) in adapted.items()}
    host.update({peft_key(name(m), "B"): host_array(b).T for m, (_, b) in adapted.items()})
    if not primary:
        return Path(out_dir)
    tmp = prepare_output_dir(out_dir, overwrite)
    try:
        names = sorted(host)
        write_file(tmp / WEIGHTS_FILE, [(n, host[n].shape, host[n].dtype) for n in names], host.__getitem__)
        config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_model_name_or_path),
                      r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      target_modules=sorted(map(name, settings["targets"])), bias="none", use_dora=False, use_rslora=False,
                      fan_in_fan_out=False, modules_to_save=None, inference_mode=True, init_lora_weights=True)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(Path(model.hf_source.directory) if model.hf_source.directory else None, tmp,
                             chat_template)
        commit_output_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


def _read_factors(weights: Path, model_type: str | None) -> dict[str, dict[str, np.ndarray]]:
    """{our module path: {"A": [r, in], "B": [out, r]} and, where PEFT saved the adapted layer's own weight,
    "base": [out, in]} of a PEFT weights file."""
    file, factors = SafetensorsFile(weights), {}
    for key in file.keys():
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            raise CheckpointError(f"{weights}: tensor {key} is not a LoRA weight (base_model.model.<module>.lora_A"
                                  f".weight, .lora_B.weight or .base_layer.weight); only plain LoRA adapters can be "
                                  f"loaded")
        factor = match["factor"] or "base"
        factors.setdefault(from_peft_name(match["module"], model_type), {})[factor] = np.asarray(file.get(key))
    return factors


def load_peft_adapter(model: nnx.Module, adapter_dir, *, mesh: Mesh | None = None,
                      rules: Mapping = DEFAULT_RULES) -> list[str]:
    """Attach the PEFT LoRA adapter in `adapter_dir` to the model's Linear layers (in place); returns their paths.

    lora_a = A.T, lora_b = B.T, scale lora_alpha / r (lora_alpha / sqrt(r) with use_rslora), dropout lora_dropout;
    an adapted layer's weight saved with the adapter (PEFT's `base_layer.weight`, e.g. for lm_head) replaces the base
    model's, as PEFT does (a warning names it when they differ). The factors are placed on their `param_shardings`
    (`rules`) over `mesh`, by default the mesh the model's parameters are on; a replaced weight keeps its sharding.
    """
    directory = Path(adapter_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory}: missing {name}; a PEFT adapter directory has {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE} (save it with safe_serialization)")
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported; only LORA is")
    for key, plain in PLAIN_LORA.items():
        if config.get(key, plain) not in (plain, None):
            raise CheckpointError(f"{config_path}: {key}={config[key]!r} is not supported; only plain LoRA "
                                  f"({key}={plain!r}) can be loaded")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise CheckpointError(f"{config_path}: {key} is not supported; only adapters with one r and alpha "
                                  f"for every module and no fully trained modules can be loaded")
    if adapters(model):
        raise ValueError("the model already has LoRA adapters; load the PEFT adapter into a model without them")
    weights = directory / WEIGHTS_FILE
    factors = _read_factors(weights, model_type_of(model))
    if not factors:
        raise CheckpointError(f"{weights}: holds no LoRA weights")
    linears, r, unadaptable = linear_modules(model), int(config["r"]), unadaptable_modules(model)
    # Per-layer module name -> (our module path, its per-layer names): a scanned module stands for every layer's.
    owner = {n: (name, names) for name, layer in linears.items() for names in [layer_names(name, layer)] for n in names}
    for module, pair in sorted(factors.items()):
        if module in unadaptable:
            raise CheckpointError(f"{weights}: module {module} has a LoRA adapter, which this "
                                  f"{type(model).__name__} cannot apply: {unadaptable[module]}")
        if module not in owner:
            raise CheckpointError(f"{weights}: module {module} is not a Linear layer of this "
                                  f"{type(model).__name__}; was the adapter trained for another model?")
        layer, names = linears[owner[module][0]], owner[module][1]
        if len(names) > 1 and not all(n in factors for n in names):
            raise CheckpointError(f"{weights}: module {module} has a LoRA adapter in only some layers, but scanned "
                                  f"layers (model.scan_layers=true) are adapted in every layer or none; load it with "
                                  f"model.scan_layers=false")
        if len(names) > 1 and "base" in pair:
            raise CheckpointError(f"{weights}: module {module} has base_layer.weight, which scanned layers "
                                  f"(model.scan_layers=true) cannot take; load it with model.scan_layers=false")
        if not {"A", "B"} <= set(pair):
            raise CheckpointError(f"{weights}: module {module} lacks lora_{({'A', 'B'} - set(pair)).pop()}")
        if "base" in pair and pair["base"].shape != (layer.out_features, layer.in_features):
            raise CheckpointError(f"{weights}: module {module} has base_layer.weight {list(pair['base'].shape)}; the "
                                  f"layer needs [{layer.out_features}, {layer.in_features}]")
        if pair["A"].shape != (r, layer.in_features) or pair["B"].shape != (layer.out_features, r):
            raise CheckpointError(f"{weights}: module {module} has lora_A {list(pair['A'].shape)} and lora_B "
                                  f"{list(pair['B'].shape)}; r={r} and the layer need [{r}, {layer.in_features}] "
                                  f"and [{layer.out_features}, {r}]")
    targets = apply_lora(model, r=r, alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                         target_modules=sorted(factors))
    mesh = params_mesh(model) if mesh is None else mesh
    paths = {path_str(p): tuple(p) for p, node in nnx.iter_graph(model) if isinstance(node, Linear)}
    shardings = param_shardings(model, {paths[m] + (leaf,): getattr(linears[m], leaf)[...].shape
                                        for m in targets for leaf in ("lora_a", "lora_b")}, mesh, rules)
    for module in targets:
        layer, names = linears[module], layer_names(module, linears[module])

        def factor(key, names=names):  # ours [in, r] / [r, out], stacked [L, ...] for a scanned module
            return factors[module][key].T if names == [module] else np.stack([factors[n][key].T for n in names])
        layer.lora_a = LoRAParam(_placed(factor("A"), layer.lora_a[...].dtype, shardings[paths[module] + ("lora_a",)]))
        layer.lora_b = LoRAParam(_placed(factor("B"), layer.lora_b[...].dtype, shardings[paths[module] + ("lora_b",)]))
        if config.get("use_rslora"):
            layer.lora_scale = float(config["lora_alpha"]) / r ** 0.5
        pair = factors.get(module, {})
        if "base" in pair:
            kernel = layer.kernel[...]
            if not np.array_equal(host_array(kernel), pair["base"].T.astype(kernel.dtype)):
                log.warning("%s: %s.base_layer.weight differs from the base model's %s weight; using the adapter's, "
                            "as PEFT does", weights, to_peft_name(module, model_type_of(model)), module)
            layer.kernel = nnx.Param(_placed(pair["base"].T, kernel.dtype, kernel.sharding))
    return targets


def _placed(host: np.ndarray, dtype, sharding) -> jax.Array:
    """`host` cast to `dtype` as a global array with `sharding` (each process supplies its own shards)."""
    host = np.ascontiguousarray(host).astype(dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
