"""LoRA as param-tree adapters on the model's Linear layers.

Each targeted `Linear` gets `lora_a` [in, r] (HF PEFT's default init: kaiming-uniform with a=sqrt(5), i.e.
U(-1/sqrt(in), 1/sqrt(in))) and `lora_b` [r, out] (zeros), scale alpha / r, optional dropout on the adapter input.
They are `LoRAParam` variables, so `nnx.split(model, LoRAParam, nnx.Param)` yields the adapters as their own pytree:
gradients and optimizer state exist only for them. `adapters(model)` gives the `{module path: (A, B)}` view.

Scanned layers (`model.scan_layers`) are one Linear per projection for all layers: its adapter is stacked, lora_a
[L, in, r] and lora_b [L, r, out]; patterns are matched against the per-layer names (`layers.layer_names`) and must
select every layer or none; `adapters` and `lora_settings` speak per-layer names, as the unrolled model does.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from automodel_jax.models.layers import (OUTPUT_LAYERS, AmaxHistory, Embedding, Linear, LoRAParam, layer_names,
                                         linear_modules, patterns_select)
from automodel_jax.models.params import module_matches, path_str, pure_dict

ALL_LINEAR = "all-linear"


def lora_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        method="lora",  # "lora" or "none" (full-parameter SFT)
        r=8, alpha=32.0, dropout=0.0,
        target_modules=("*_proj",),  # globs on module names/paths, "re:<regex>" on full paths, or "all-linear"
        exclude_modules=(),
    ))


def unadaptable_modules(model: nnx.Module) -> dict[str, str]:
    """{module path: why} of the modules a target pattern may name that have no Linear to adapt: embeddings, and on a
    model with tied embeddings its output head (`lm_head`, which reads the embedding table). PEFT would wrap them
    (LoRA on nn.Embedding; an lm_head sharing the embedding weight); naming one is an error here, never a no-op."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    out = {}
    for p, node in nnx.iter_graph(model):
        if isinstance(node, Embedding):
            name = path_str(p)
            out[name] = "LoRA on embeddings is not supported (only Linear layers are adapted)"
            if tied and name.endswith("model.embed_tokens"):
                out[name[:-len("model.embed_tokens")] + "lm_head"] = (
                    f"the model ties its output head to {name} (tie_word_embeddings=true), so there is no lm_head "
                    f"layer to adapt")
    return out


def find_targets(model: nnx.Module, target_modules: str | Sequence[str],
                 exclude_modules: Sequence[str] = ()) -> list[str]:
    """Module paths (HF names such as `model.layers.0.self_attn.q_proj`; `model.layers.self_attn.q_proj` for scanned
    layers) of the Linear layers to adapt."""
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    linears = linear_modules(model)

    def selected(name, pattern_list, key):
        return patterns_select(name, linears[name], pattern_list, key)
    if ALL_LINEAR in patterns:
        chosen = [n for n in linears if n.rsplit(".", 1)[-1] not in OUTPUT_LAYERS]
    else:
        chosen = [n for n in linears if selected(n, patterns, "peft.target_modules")]
    chosen = [n for n in chosen if not selected(n, exclude_modules, "peft.exclude_modules")]
    if ALL_LINEAR not in patterns:
        for name, why in unadaptable_modules(model).items():
            hit = next((p for p in patterns if module_matches(name, p)), None)
            if hit is not None and not any(module_matches(name, p) for p in exclude_modules):
                raise ValueError(f"peft.target_modules pattern {hit!r} names {name}, which LoRA cannot adapt here: "
                                 f"{why}; remove it from peft.target_modules or add it to peft.exclude_modules")
    if not chosen:
        names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"peft.target_modules {patterns} matches no Linear layer; layer names are {names}")
    return chosen


def apply_lora(model: nnx.Module, *, r: int, alpha: float, dropout: float = 0.0,
               target_modules: str | Sequence[str] = ("*_proj",), exclude_modules: Sequence[str] = (),
               seed: int = 0, param_dtype=jnp.float32) -> list[str]:
    """Attach fresh adapters to the targeted layers (in place); returns their module paths."""
    if r <= 0:
        raise ValueError(f"peft.r must be a positive integer, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"peft.dropout must be in [0, 1), got {dropout}")
    targets = find_targets(model, target_modules, exclude_modules)
    linears = linear_modules(model)
    key = jax.random.key(seed)
    # Each adapted per-layer module draws from its own salt, its index among them in the unrolled model's order, so
    # scanned layers start from the same adapters as unrolled ones.
    per_layer = sorted(((n, name) for name in targets for n in layer_names(name, linears[name])),
                       key=lambda pair: _name_order(pair[0]))
    salts = {n: salt for salt, (n, _) in enumerate(per_layer)}
    for name in targets:
        layer, names = linears[name], layer_names(name, linears[name])
        bound = 1.0 / math.sqrt(layer.in_features)
        a = jnp.stack([jax.random.uniform(jax.random.fold_in(key, salts[n]), (layer.in_features, r), jnp.float32,
                                          -bound, bound) for n in names])
        b = jnp.zeros((len(names), r, layer.out_features), param_dtype)
        stacked = names != [name]
        layer.lora_a = LoRAParam((a if stacked else a[0]).astype(param_dtype))
        layer.lora_b = LoRAParam(b if stacked else b[0])
        layer.lora_scale, layer.lora_dropout, layer.lora_salt = alpha / r, float(dropout), salts[names[0]]
    return targets


def _name_order(name: str) -> tuple:
    """Sort key of a module path as nnx orders modules: names alphabetically, layer indices numerically."""
    return tuple((0, int(k), "") if k.isdigit() else (1, 0, k) for k in name.split("."))


def adapters(model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{module path: (A [in, r], B [r, out])} for every adapted layer, by per-layer name (a scanned module's stacked
    adapter gives one entry per layer, its slice [i])."""
    out = {}
    for name, layer in linear_modules(model).items():
        if layer.lora_a is not None:
            names = layer_names(name, layer)
            if names == [name]:
                out[name] = (layer.lora_a[...], layer.lora_b[...])
            else:
                out.update({n: (layer.lora_a[i], layer.lora_b[i]) for i, n in enumerate(names)})
    return out


def lora_settings(model: nnx.Module) -> dict:
    """r, alpha, dropout and targets (per-layer module paths) of the model's adapters (all adapters share them)."""
    adapted = {n: l for n, l in linear_modules(model).items() if l.lora_a is not None}
    if not adapted:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(adapted.values()))
    r = first.lora_a.shape[-1]
    targets = sorted(n for name, layer in adapted.items() for n in layer_names(name, layer))
    return dict(r=r, alpha=first.lora_scale * r, dropout=first.lora_dropout, targets=targets)


def merged_kernels(model: nnx.Module) -> dict[tuple, jax.Array]:
    """{path of kernel: kernel + scale * A @ B} for every adapted layer (computed in float32, cast back)."""
    out = {}
    for p, layer in nnx.iter_graph(model):
        if isinstance(layer, Linear) and layer.lora_a is not None:
            kernel = layer.kernel[...]
            # matmul: batched over the layer axis of scanned layers ([L, in, r] @ [L, r, out])
            delta = jnp.matmul(layer.lora_a[...].astype(jnp.float32), layer.lora_b[...].astype(jnp.float32))
            out[tuple(p) + ("kernel",)] = (kernel.astype(jnp.float32) + layer.lora_scale * delta).astype(kernel.dtype)
    return out


def merge_lora(model: nnx.Module) -> None:
    """Fold every adapter into its base kernel and remove the adapter (in place)."""
    merged = merged_kernels(model)
    for p, layer in nnx.iter_graph(model):
        if isinstance(layer, Linear) and layer.lora_a is not None:
            layer.kernel[...] = merged[tuple(p) + ("kernel",)]
            layer.lora_a, layer.lora_b = None, None
            layer.lora_scale, layer.lora_dropout, layer.lora_salt = 0.0, 0.0, 0


def split_model(model: nnx.Module, lora: bool, frozen: Sequence[str] = ()):
    """(graphdef, trainable, frozen) as nested dicts: adapters vs base for LoRA; for full SFT every parameter except
    those of modules matching a `frozen` pattern (same syntax as target_modules; e.g. a frozen vision tower). Delayed
    FP8 scaling state is in neither (`layers.amax_histories(model)`; `nnx.merge` needs it as a third tree)."""
    if lora:
        graphdef, trainable, frozen_state, _ = nnx.split(model, LoRAParam, nnx.Param, AmaxHistory)
        return graphdef, pure_dict(trainable), pure_dict(frozen_state)
    if not frozen:
        graphdef, trainable, _ = nnx.split(model, nnx.Param, AmaxHistory)
        return graphdef, pure_dict(trainable), {}

    def is_frozen(path, _value) -> bool:
        module = path_str(tuple(path[:-1]))
        return any(module_matches(module, p) for p in frozen)

    graphdef, frozen_state, trainable, _ = nnx.split(model, nnx.All(nnx.Param, is_frozen), nnx.Param, AmaxHistory)
    return graphdef, pure_dict(trainable), pure_dict(frozen_state)
