"""The mesh, the one rule table that maps logical axis names to mesh axes, and the activation-constraint helper.

Layers declare logical axes for their parameters (`Linear.axes`, ...); activations use the same names through
`constrain`. A logical axis maps to a mesh axis (or a tuple of them, or None = replicated). A mesh axis that does not
divide the dimension is dropped for that dimension (replicated), except for STRICT_AXES: there it is a clear error.
`check_mesh_fits` validates a mesh against the model and batch before anything is loaded or compiled.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# The logical name of the leading [num_layers] axis of scanned layers' parameters (`param_axes`).
LAYER_AXIS = "layers"

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
    "vision_heads": "tensor",  # a vision tower's attention features (not strict: its head count is not checked)
    "norm": None,
    "lora": None,
    LAYER_AXIS: None,  # the leading layer axis of scanned decoder layers' stacked parameters (never sharded)
}

# Dimensions whose mesh axis must divide them: silently replicating these would change the parallel layout asked for.
STRICT_AXES = ("heads", "kv_heads", "seq")

# Keys and values as attention reads them under context parallelism: every position (seq unsharded).
GATHERED_KV_AXES = ("batch", None, "kv_heads", None)


class MeshConfigError(ValueError):
    """A mesh that does not fit the devices, the model or the batch; the message names the numbers and the fix."""


def rules_for(zero3_over_data: bool = False) -> dict:
    """The rule table; `zero3_over_data` also shards parameters, gradients and optimizer state over `data`
    (ZeRO-3 across every data-parallel rank instead of only the fsdp ones)."""
    return {**DEFAULT_RULES, "embed": ("fsdp", "data")} if zero3_over_data else dict(DEFAULT_RULES)


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A mesh with axes MESH_AXES. `shape` gives sizes; one may be -1 (the rest). None = one device."""
    devices = list(devices) if devices is not None else [jax.devices()[0]] if shape is None else jax.devices()
    sizes = {axis: 1 for axis in MESH_AXES}
    for axis, size in dict(shape or {}).items():
        if axis not in sizes:
            raise MeshConfigError(f"unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}")
        if int(size) < 1 and int(size) != -1:
            raise MeshConfigError(f"mesh.{axis}={size}: a mesh axis size must be positive, or -1 for the rest")
        sizes[axis] = int(size)
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshConfigError(f"mesh: only one axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise MeshConfigError(f"mesh: {len(devices)} devices are not divisible by the fixed axes' product "
                                  f"{known}; change the fixed sizes")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        layout = " x ".join(f"{a}={s}" for a, s in sizes.items())
        raise MeshConfigError(f"mesh {layout} needs {math.prod(sizes.values())} devices but {len(devices)} are "
                              f"available; make the product of the axis sizes equal the device count (or use -1)")
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_cfg: Mapping, devices: Sequence | None = None) -> tuple[Mesh, dict]:
    """(mesh, rules) from the recipe's `mesh` section: axis sizes plus `zero3_over_data`."""
    cfg = dict(mesh_cfg)
    zero3 = bool(cfg.pop("zero3_over_data", False))
    return make_mesh(cfg, devices), rules_for(zero3)


def check_mesh_fits(mesh_shape: Mapping[str, int], *, num_heads: int, num_kv_heads: int, seq_len: int,
                    batch_rows: int) -> None:
    """Raise MeshConfigError unless the mesh (`mesh.shape`) divides the model and the batch, before loading or
    compiling.

    tensor must divide the attention and key/value heads (each device keeps whole heads), context the sequence
    length, and data x fsdp the rows of one micro-batch.
    """
    tensor, context = mesh_shape["tensor"], mesh_shape["context"]
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    for what, size, axis, axis_size in (("num_attention_heads", num_heads, "tensor", tensor),
                                        ("num_key_value_heads", num_kv_heads, "tensor", tensor),
                                        ("data.seq_len", seq_len, "context", context),
                                        ("micro-batch rows", batch_rows, "data x fsdp", dp)):
        if size % axis_size:
            raise MeshConfigError(f"{what} {size} is not divisible by mesh {axis} = {axis_size}; choose mesh sizes "
                                  f"that divide it (or change {what})")


def check_process_layout(mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> None:
    """Each process feeds its own rows of the batch, so no two processes may hold the same batch rows (that happens
    when tensor x context spans processes); raise MeshConfigError naming the sizes otherwise."""
    dp = math.prod(mesh.shape[a] for a in _mesh_axes(rules.get("batch")))
    blocks = activation_sharding(mesh, ("batch",), rules).devices_indices_map((dp,))
    owners: dict[tuple, set[int]] = {}
    for device, index in blocks.items():
        owners.setdefault(index[0].indices(dp), set()).add(device.process_index)
    shared = [procs for procs in owners.values() if len(procs) > 1]
    if shared:
        model_parallel = mesh.size // dp
        raise MeshConfigError(f"processes {sorted(shared[0])} would hold the same batch rows: the model-parallel "
                              f"axes (tensor x context = {model_parallel} devices) must fit within one process's "
                              f"{jax.local_device_count()} devices; make tensor x context divide it")


def _mesh_axes(mapped) -> tuple[str, ...]:
    return (mapped,) if isinstance(mapped, str) else tuple(mapped or ())


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping = DEFAULT_RULES, where: str = "") -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions have logical names `axes`."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        mesh_axes = _mesh_axes(rules.get(name) if name is not None else None)
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if size > 1 and dim % size:
            if name in STRICT_AXES:
                raise MeshConfigError(f"{where or 'array'}: dimension {name!r} of size {dim} is not divisible by "
                                      f"mesh axes {mesh_axes} of size {size}; choose mesh sizes that divide it")
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def param_axes(module: nnx.Module) -> dict[tuple, tuple]:
    """{param path: logical axes} for every parameter of `module`, from the `axes` its layers declare.

    LoRA factors follow their base kernel [in, out]: lora_a [in, r] keeps the input axis, lora_b [r, out] the output
    axis, so x @ A @ B needs no more communication than x @ kernel. A parameter with one dimension more than its layer
    declares belongs to scanned layers (stacked [num_layers, ...]): its leading axis is LAYER_AXIS."""
    out = {}

    def add(path, var, axes):
        stacked = len(var.shape) == len(axes) + 1
        out[path] = (LAYER_AXIS,) + tuple(axes) if stacked else tuple(axes)

    for path, node in nnx.iter_graph(module):
        axes = getattr(node, "axes", None)
        if not isinstance(node, nnx.Module) or axes is None:
            continue
        path = tuple(path)
        for leaf in ("kernel", "embedding", "scale"):
            if getattr(node, leaf, None) is not None:
                add(path + (leaf,), getattr(node, leaf), axes)
        if getattr(node, "bias", None) is not None:
            add(path + ("bias",), node.bias, axes[-1:])
        if getattr(node, "lora_a", None) is not None:
            add(path + ("lora_a",), node.lora_a, (axes[0], "lora"))
            add(path + ("lora_b",), node.lora_b, ("lora", axes[1]))
    return out


def params_mesh(module: nnx.Module) -> Mesh:
    """The mesh `module`'s parameters are sharded over (a one-device mesh when none has a NamedSharding)."""
    for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return make_mesh()


def param_shardings(module: nnx.Module, shapes: Mapping[tuple, Sequence[int]], mesh: Mesh,
                    rules: Mapping = DEFAULT_RULES) -> dict[tuple, NamedSharding]:
    """{param path: NamedSharding} for the paths in `shapes`."""
    axes = param_axes(module)
    return {path: NamedSharding(mesh, logical_to_spec(axes[path], shape, mesh, rules, ".".join(map(str, path))))
            for path, shape in shapes.items()}


def shardings_like_params(tree, params: Mapping[tuple, jax.ShapeDtypeStruct], shardings: Mapping[tuple, NamedSharding],
                          mesh: Mesh):
    """Shardings for a pytree such as optimizer state: a leaf whose key path ends with a parameter's path and whose
    shape is that parameter's gets the parameter's sharding (Adam moments, ZeRO style); anything else (counts,
    scalars) is replicated. `params` and `shardings` are keyed by parameter path."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(key_path, leaf):
        keys = tuple(k.key for k in key_path if isinstance(k, jax.tree_util.DictKey))
        for start in range(len(keys)):
            path = keys[start:]
            if path in shardings and tuple(params[path].shape) == tuple(np.shape(leaf)):
                return shardings[path]
        return replicated
    return jax.tree_util.tree_map_with_path(pick, tree)


def activation_sharding(mesh: Mesh, axes: Sequence[str | None], rules: Mapping = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an activation such as a [batch, seq] token array (no divisibility fallback: inputs must fit)."""
    spec = []
    for name in axes:
        mapped = rules.get(name) if name is not None else None
        spec.append(mapped if mapped is None or isinstance(mapped, str) else tuple(mapped))
    return NamedSharding(mesh, PartitionSpec(*spec))


# The (mesh, rules) that `constrain` applies; set only while a step function is being traced (see `sharding_rules`).
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping] | None] = contextvars.ContextVar("sharding_rules", default=None)


@contextlib.contextmanager
def sharding_rules(mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> Iterator[None]:
    """Within this context, `constrain` pins activations to `mesh` by `rules`; outside it, it does nothing.

    Enter it inside the function that jit traces (`with_sharding_rules` does): jit caches a trace per function and
    arguments, not per context, so a function already traced outside the context would keep its unconstrained trace.
    """
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def with_sharding_rules(fn: Callable, mesh: Mesh, rules: Mapping = DEFAULT_RULES) -> Callable:
    """`fn` run inside `sharding_rules(mesh, rules)`, so jit traces it with the model's activation constraints
    (the context is part of the function, not of the caller, so a cached trace always matches it)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with sharding_rules(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint from its logical `axes` (e.g. ("batch", "seq", "embed")) under the active
    mesh and rules; `x` unchanged when no `sharding_rules` context is active (single device, generation)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, x.shape, mesh, rules, f"activation {tuple(axes)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def context_parallel() -> bool:
    """True while the active mesh shards the sequence (attention must then see keys/values of every position)."""
    active = _ACTIVE.get()
    return active is not None and active[0].shape["context"] > 1


def tensor_parallel() -> bool:
    """True while the active mesh splits parameters over `tensor` (Megatron-style column/row-parallel kernels)."""
    active = _ACTIVE.get()
    return active is not None and active[0].shape["tensor"] > 1


def gather_kv(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys/values [B, S, K, D] unsharded along the sequence, for queries that stay sharded along it.

    This is how context parallelism stays exact: each device keeps its slice of the queries and the whole keys and
    values (an all-gather over `context`), so the causal mask and the softmax see every key with its true global
    position. It is the simplest exact scheme: no online-softmax merging, no per-shard mask offsets. K/V memory per
    device is O(seq) (small next to the O(seq^2 / context) scores, and further cut by grouped-query attention), fine up
    to long contexts; ring attention would overlap the transfer with compute and keep K/V at O(seq / context), at the
    cost of a custom kernel loop.
    """
    return constrain(k, GATHERED_KV_AXES), constrain(v, GATHERED_KV_AXES)


def tree_shardings(model: nnx.Module, tree: dict, mesh, rules=DEFAULT_RULES) -> dict:
    """NamedShardings for a nested-dict params pytree of `model` (same structure), by the rule table."""
    def path_of(keys):
        return tuple(k.key for k in keys)
    shapes = {path_of(keys): x.shape for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    shardings = param_shardings(model, shapes, mesh, rules)
    return jax.tree_util.tree_map_with_path(lambda keys, _: shardings[path_of(keys)], tree)
