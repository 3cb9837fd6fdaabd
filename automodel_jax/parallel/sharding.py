"""The mesh and the one rule table that maps logical axis names to mesh axes.

Layers declare logical axes for their parameters (`Linear.axes`, ...); activations use the names below too. A logical
axis maps to a mesh axis (or a tuple of them, or None = replicated). A mesh axis that does not divide the dimension is
dropped for that dimension (replicated), except where `strict` names it: there it is a clear error.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Megatron-style tensor parallelism (column-parallel q/k/v/gate/up, row-parallel o/down, vocab-parallel embedding and
# lm_head) plus FSDP over the hidden dimension of every weight; batch over data and fsdp; sequence over context.
DEFAULT_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp"),
    "seq": "context",
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "lora": None,
}

# Dimensions whose mesh axis must divide them: silently replicating these would change the parallel layout asked for.
STRICT_AXES = ("heads", "kv_heads", "seq")


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes MESH_AXES. `shape` gives sizes; one may be -1 (the rest). None = one device."""
    devices = list(devices) if devices is not None else [jax.devices()[0]] if shape is None else jax.devices()
    sizes = {axis: 1 for axis in MESH_AXES}
    for axis, size in dict(shape or {}).items():
        if axis not in sizes:
            raise ValueError(f"unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}")
        sizes[axis] = int(size)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product {known}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {len(devices)} are "
                         f"available; make the product of the axis sizes equal the device count (or use -1)")
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping = DEFAULT_RULES, where: str = "") -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions have logical names `axes`."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        mapped = rules.get(name) if name is not None else None
        mesh_axes = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if size > 1 and dim % size:
            if name in STRICT_AXES:
                raise ValueError(f"{where or 'array'}: dimension {name!r} of size {dim} is not divisible by mesh "
                                 f"axes {mesh_axes} of size {size}; choose mesh sizes that divide it")
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def param_axes(module: nnx.Module) -> dict[tuple, tuple]:
    """{param path: logical axes} for every parameter of `module`, from the `axes` its layers declare."""
    out = {}
    for path, node in nnx.iter_graph(module):
        axes = getattr(node, "axes", None)
        if not isinstance(node, nnx.Module) or axes is None:
            continue
        for leaf in ("kernel", "embedding", "scale"):
            if getattr(node, leaf, None) is not None:
                out[tuple(path) + (leaf,)] = axes
        if getattr(node, "bias", None) is not None:
            out[tuple(path) + ("bias",)] = axes[-1:]
        if getattr(node, "lora_a", None) is not None:
            out[tuple(path) + ("lora_a",)] = (axes[0], "lora")
            out[tuple(path) + ("lora_b",)] = ("lora", axes[1])
    return out


def param_shardings(module: nnx.Module, shapes: Mapping[tuple, Sequence[int]], mesh: Mesh,
                    rules: Mapping = DEFAULT_RULES) -> dict[tuple, NamedSharding]:
    """{param path: NamedSharding} for the paths in `shapes`."""
    axes = param_axes(module)
    return {path: NamedSharding(mesh, logical_to_spec(axes[path], shape, mesh, rules, ".".join(map(str, path))))
            for path, shape in shapes.items()}


def activation_sharding(mesh: Mesh, axes: Sequence[str | None], rules: Mapping = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an activation such as a [batch, seq] token array (no divisibility fallback: inputs must fit)."""
    spec = []
    for name in axes:
        mapped = rules.get(name) if name is not None else None
        spec.append(mapped if mapped is None or isinstance(mapped, str) else tuple(mapped))
    return NamedSharding(mesh, PartitionSpec(*spec))
