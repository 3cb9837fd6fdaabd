"""Mesh construction and validation, the rule table, and `constrain`, in this process (one device is enough here;
multi-device layouts are checked in test_mesh_equivalence.py)."""
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from automodel_jax.parallel.sharding import (DEFAULT_RULES, MeshConfigError, check_mesh_fits, check_process_layout,
                                             constrain, context_parallel, logical_to_spec, make_mesh,
                                             mesh_from_config, rules_for, sharding_rules, shardings_like_params,
                                             with_sharding_rules)

EIGHT = [object()] * 8  # only counted: the errors below are raised before a Mesh is built


def sizes(**axes) -> dict[str, int]:
    return {"data": 1, "fsdp": 1, "tensor": 1, "context": 1, **axes}


@pytest.mark.parametrize("shape, message", [
    (dict(data=2, fsdp=3), "mesh data=2 x fsdp=3 x tensor=1 x context=1 needs 6 devices but 8 are available"),
    (dict(tensor=3, fsdp=-1), "8 devices are not divisible by the fixed axes' product 3"),
    (dict(data=-1, fsdp=-1), "only one axis may be -1"),
    (dict(pipeline=2), "unknown mesh axis 'pipeline'"),
    (dict(fsdp=0), "mesh.fsdp=0: a mesh axis size must be positive, or -1"),
])
def test_bad_mesh_sizes_are_named(shape, message):
    with pytest.raises(MeshConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_mesh(shape, devices=EIGHT)


def test_mesh_from_config_fills_the_free_axis_and_reads_zero3():
    mesh, rules = mesh_from_config(dict(data=1, fsdp=-1, tensor=1, context=1, zero3_over_data=False))
    assert dict(mesh.shape) == sizes(fsdp=jax.device_count()) and rules == DEFAULT_RULES
    _, zero3 = mesh_from_config(dict(fsdp=-1, zero3_over_data=True))
    assert zero3["embed"] == ("fsdp", "data") and {k: v for k, v in zero3.items() if k != "embed"} == {
        k: v for k, v in DEFAULT_RULES.items() if k != "embed"}
    assert rules_for() == DEFAULT_RULES and rules_for() is not DEFAULT_RULES


@pytest.mark.parametrize("mesh, model, message", [
    (sizes(tensor=4), dict(num_heads=6), "num_attention_heads 6 is not divisible by mesh tensor = 4"),
    (sizes(tensor=4), dict(num_kv_heads=2), "num_key_value_heads 2 is not divisible by mesh tensor = 4"),
    (sizes(context=4), dict(seq_len=30), "data.seq_len 30 is not divisible by mesh context = 4"),
    (sizes(data=2, fsdp=2), dict(batch_rows=6), "micro-batch rows 6 is not divisible by mesh data x fsdp = 4"),
])
def test_mesh_that_does_not_divide_the_model_or_batch(mesh, model, message):
    fits = dict(num_heads=8, num_kv_heads=4, seq_len=32, batch_rows=8)
    check_mesh_fits(mesh, **fits)
    with pytest.raises(MeshConfigError, match=message):
        check_mesh_fits(mesh, **{**fits, **model})


def test_single_process_layout_is_always_fine():
    check_process_layout(make_mesh({"fsdp": -1}))


class FakeMesh:
    """Only `.shape` is read by logical_to_spec: lets the rule logic run for 8-way meshes on one device."""
    def __init__(self, **axes):
        self.shape = sizes(**axes)


def test_rules_map_logical_axes_and_drop_what_does_not_divide():
    mesh = FakeMesh(fsdp=2, tensor=4)
    assert logical_to_spec(("embed", "heads"), (32, 64), mesh) == PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), (30, 32), mesh) == PartitionSpec(None, "fsdp")  # 30 % 4: replicate
    zero3 = rules_for(zero3_over_data=True)
    assert logical_to_spec(("embed", "mlp"), (32, 64), FakeMesh(data=2, fsdp=2), zero3) == \
        PartitionSpec(("fsdp", "data"), None)
    # A mesh axis is used once per array: batch took fsdp, so embed stays whole.
    assert logical_to_spec(("batch", "seq", "embed"), (8, 16, 32), FakeMesh(fsdp=2, context=2)) == \
        PartitionSpec("fsdp", "context", None)
    with pytest.raises(MeshConfigError, match="dimension 'heads' of size 6 is not divisible by mesh axes"):
        logical_to_spec(("embed", "heads"), (32, 6), mesh, where="q_proj.kernel")


def test_constrain_is_a_no_op_without_rules_and_a_constraint_with_them():
    x = jnp.ones((2, 4, 8))

    def pin(x):
        return constrain(x, ("batch", "seq", "embed")) * 2

    def traced(fn) -> str:  # a fresh function object each time: jax caches traces per function
        return str(jax.make_jaxpr(lambda x: fn(x))(x))
    assert constrain(x, ("batch", "seq", "embed")) is x
    assert "sharding_constraint" not in traced(pin)
    mesh, rules = mesh_from_config({}, devices=jax.devices()[:1])
    with sharding_rules(mesh, rules):
        assert "sharding_constraint" in traced(pin)
        assert not context_parallel()  # context = 1
    assert "sharding_constraint" in traced(with_sharding_rules(pin, mesh, rules))
    assert "sharding_constraint" not in traced(pin)  # the context ended with the call


def test_optimizer_moments_take_their_parameters_shardings():
    mesh = make_mesh()
    # adafactor factors the 128 x 256 kernel's second moment into rows and columns: those keep no param sharding.
    params = {"layer": {"kernel": jnp.ones((128, 256)), "scale": jnp.ones((256,))}}
    kernel_sharding = NamedSharding(mesh, PartitionSpec(None, None))  # a distinct object per parameter
    scale_sharding = NamedSharding(mesh, PartitionSpec(None))
    by_path = {("layer", "kernel"): kernel_sharding, ("layer", "scale"): scale_sharding}
    shapes = {("layer", "kernel"): params["layer"]["kernel"], ("layer", "scale"): params["layer"]["scale"]}
    for optimizer in (optax.adamw(1e-3), optax.adafactor(1e-3)):
        state = jax.eval_shape(optimizer.init, params)
        picked = jax.tree_util.tree_flatten_with_path(shardings_like_params(state, shapes, by_path, mesh))[0]
        leaves = dict(jax.tree_util.tree_flatten_with_path(state)[0])
        kinds = set()
        for key_path, sharding in picked:
            names = tuple(getattr(k, "key", None) for k in key_path)
            same_shape = names[-2:] in by_path and leaves[key_path].shape == shapes[names[-2:]].shape
            if same_shape:
                assert sharding is by_path[names[-2:]]
            else:
                assert sharding.spec == PartitionSpec()
            kinds.add(same_shape)
        assert kinds == {True, False}
    adam = shardings_like_params(jax.eval_shape(optax.adam(1e-3).init, params), shapes, by_path, mesh)
    assert adam[0].mu["layer"]["kernel"] is kernel_sharding and adam[0].nu["layer"]["scale"] is scale_sharding
