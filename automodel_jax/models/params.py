"""Parameters as plain pytrees: nested dicts from NNX state, and flat {path tuple: array} views of them.

Training and checkpointing work on these explicit pytrees; `nnx.merge(graphdef, tree)` rebuilds the module.
"""
from __future__ import annotations

import fnmatch
import re

from flax import nnx


def pure_dict(module_or_state, *filters) -> dict:
    """Nested {name: array} dict of `module_or_state` (optionally only the variables matching `filters`)."""
    state = nnx.state(module_or_state, *filters) if isinstance(module_or_state, nnx.Module) else module_or_state
    to_pure = getattr(nnx, "to_pure_dict", None)
    return to_pure(state) if to_pure is not None else state.to_pure_dict()


def flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def unflatten(flat: dict[tuple, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def path_str(path: tuple) -> str:
    return ".".join(map(str, path))


def module_matches(name: str, pattern: str) -> bool:
    """Whether module path `name` (e.g. `model.layers.0.self_attn.q_proj`) matches `pattern`, as PEFT's
    target_modules reads it: "re:<regex>" on the full path, a glob on the last name or the full path, or a plain name
    equal to the path or its tail. Raises ValueError naming a "re:" pattern that is not a valid regular expression."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as e:
            raise ValueError(f"module pattern {pattern!r} is not a valid regular expression ({e}); fix it in "
                             f"peft.target_modules / exclude_modules or model.fp8.filter_modules") from None
    last = name.rsplit(".", 1)[-1]
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(last, pattern) or fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


# Scanned decoder layers (`DecoderConfig.scan_layers`) are one module at `...layers` whose parameters have a leading
# layer axis [L, ...]: `model.layers.self_attn.q_proj.kernel` [L, in, out] stands for `model.layers.{i}.self_attn.
# q_proj.kernel` of every layer i. A path is stacked when its `layers` key is followed by a name, not a layer index.
# These helpers are the one place that maps stacked paths to per-layer ones (HF names, PEFT names, module patterns).
STACKED = "layers"


def stacked_at(path: tuple | str) -> int | None:
    """Position of the stacked `layers` key in `path` (a tuple or a dotted name), None when `path` is not under
    scanned layers (an unrolled `layers.3....` path, or no layers at all)."""
    keys = path.split(".") if isinstance(path, str) else path
    for k in range(len(keys) - 1):
        if keys[k] == STACKED and not str(keys[k + 1]).isdigit():
            return k
    return None


def layer_path(path: tuple | str, i: int) -> tuple | str:
    """The per-layer path of layer `i` that a stacked `path` stands for (`path` itself when not stacked)."""
    at = stacked_at(path)
    if at is None:
        return path
    if isinstance(path, str):
        keys = path.split(".")
        return ".".join(keys[:at + 1] + [str(i)] + keys[at + 1:])
    return tuple(path[:at + 1]) + (i,) + tuple(path[at + 1:])


def layer_paths(path: tuple | str, num_layers: int) -> list:
    """Every per-layer path a stacked `path` stands for, layer 0 first ([path] when not stacked)."""
    return [path] if stacked_at(path) is None else [layer_path(path, i) for i in range(num_layers)]
