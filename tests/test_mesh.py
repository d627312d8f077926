"""Meshes: parsing, `-1` resolution, axis order, device use, clear errors, logical axis rules."""

import jax
import numpy as np
import pytest

from distributed.core import mesh as M
from distributed.core.mesh import (
    DEFAULT_AXIS_RULES,
    MESH_AXES,
    batch_shard_count,
    check_batch_size,
    logical_to_mesh,
    make_mesh,
    parse_mesh_axes,
    resolve_mesh_shape,
)


def _shape(mesh):
    return dict(mesh.shape)


# --------------------------------------------------------------------------- parsing / resolving


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data:-1", {"data": -1}),
        ("data:2,fsdp:4", {"data": 2, "fsdp": 4}),
        (" data : 2 , tensor:4 ,", {"data": 2, "tensor": 4}),  # whitespace, trailing comma
        ("", {}),
        ({"fsdp": -1, "tensor": 2}, {"fsdp": -1, "tensor": 2}),
        ({"data": np.int64(8)}, {"data": 8}),
    ],
)
def test_parse_mesh_axes(spec, expected):
    out = parse_mesh_axes(spec)
    assert out == expected
    assert all(type(v) is int for v in out.values())


def test_parse_keeps_order_independent_of_input_order():
    assert resolve_mesh_shape("tensor:2,data:-1", 8) == {"data": 4, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("data:-1", 8, (8, 1, 1)),
        ("data:-1,fsdp:2", 8, (4, 2, 1)),
        ("data:2,fsdp:-1,tensor:2", 8, (2, 2, 2)),
        ("tensor:-1", 8, (1, 1, 8)),
        ("fsdp:8", 8, (1, 8, 1)),
        ("data:2,fsdp:2,tensor:2", 8, (2, 2, 2)),
        ({"data": -1, "tensor": 4}, 8, (2, 1, 4)),
        ("data:-1", 1, (1, 1, 1)),
        ("data:-1,fsdp:3", 3, (1, 3, 1)),  # -1 may resolve to 1
        ("", 1, (1, 1, 1)),  # no axes at all: everything 1
    ],
)
def test_resolve_mesh_shape(spec, n, expected):
    out = resolve_mesh_shape(spec, n)
    assert list(out) == list(MESH_AXES)
    assert tuple(out.values()) == expected


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data:8", (8, 1, 1)),
        ("fsdp:-1", (1, 8, 1)),
        ("data:2,tensor:4", (2, 1, 4)),
        ({"tensor": 2, "fsdp": 2, "data": -1}, (2, 2, 2)),
    ],
)
def test_make_mesh_axes_order_and_every_device_once(spec, expected):
    mesh = make_mesh(spec)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.devices.shape == expected
    assert tuple(_shape(mesh).values()) == expected
    ids = [d.id for d in mesh.devices.flat]
    assert sorted(ids) == sorted(d.id for d in jax.devices())
    assert len(set(ids)) == 8


def test_make_mesh_default_is_pure_data_parallel():
    mesh = make_mesh()
    assert _shape(mesh) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_make_mesh_cpu_device_order_is_row_major_by_id():
    # On CPU the devices are laid out in (process, id) order, row-major over (data, fsdp, tensor).
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    assert [[[d.id for d in r] for r in p] for p in mesh.devices] == [
        [[0, 1], [2, 3]],
        [[4, 5], [6, 7]],
    ]


def test_make_mesh_on_a_subset_of_devices():
    devs = jax.devices()[:4]
    mesh = make_mesh("data:-1", devices=devs)
    assert _shape(mesh) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert {d.id for d in mesh.devices.flat} == {d.id for d in devs}

    mesh = make_mesh("data:2,tensor:2", devices=devs)
    assert _shape(mesh) == {"data": 2, "fsdp": 1, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devs)

    with pytest.raises(ValueError) as e:
        make_mesh("data:8", devices=devs)
    assert "8" in str(e.value) and "4 are available" in str(e.value)


def test_make_mesh_single_device():
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    assert mesh.devices.shape == (1, 1, 1)
    assert mesh.devices.flat[0] == jax.devices()[0]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "spec, n, must_contain",
    [
        ("data:3", 8, ["data:3", "8"]),  # too few devices used
        ("data:16", 8, ["data:16", "16", "8"]),  # too many
        ("data:2,fsdp:2", 8, ["fsdp:2", "4", "8"]),  # product 4 != 8
        ("data:-1,fsdp:3", 8, ["fsdp:3", "3", "8"]),  # fixed part does not divide
        ("data:-1,tensor:16", 8, ["tensor:16", "16", "8"]),
    ],
)
def test_mesh_that_does_not_fit(spec, n, must_contain):
    with pytest.raises(ValueError) as e:
        resolve_mesh_shape(spec, n)
    msg = str(e.value)
    for s in must_contain:
        assert s in msg, (s, msg)
    if n == 8:
        with pytest.raises(ValueError, match="8"):
            make_mesh(spec)


@pytest.mark.parametrize(
    "spec, must_contain",
    [
        ("data:0", ["'data'", "0"]),
        ({"fsdp": 0}, ["'fsdp'", "0"]),
        ("data:-2", ["'data'", "-2"]),
        ({"tensor": -5}, ["'tensor'", "-5"]),
        ("data:-1,fsdp:-1", ["data", "fsdp", "-1"]),
        ({"data": -1, "tensor": -1}, ["data", "tensor", "-1"]),
        ("model:2", ["model", "data", "fsdp", "tensor"]),  # lists the valid names
        ({"Data": 2}, ["Data"]),
        ("data=2", ["data=2", "axis:size"]),
        ("data", ["'data'", "axis:size"]),
        ("data:x", ["'x'", "data", "integer"]),
        ("data:2.5", ["2.5"]),
        ("data:", ["data"]),
        ({"data": 2.0}, ["2.0"]),
        ({"data": True}, ["True"]),
        ("data:2,data:4", ["data", "twice"]),
    ],
)
def test_malformed_mesh_specs(spec, must_contain):
    with pytest.raises(ValueError) as e:
        parse_mesh_axes(spec)
    msg = str(e.value)
    for s in must_contain:
        assert s in msg, (s, msg)
    with pytest.raises(ValueError):
        make_mesh(spec)


# --------------------------------------------------------------------------- batch checks


@pytest.mark.parametrize(
    "spec, shards",
    [("data:8", 8), ("data:4,fsdp:2", 8), ("fsdp:8", 8), ("data:2,tensor:4", 2), ("tensor:8", 1)],
)
def test_batch_shard_count(spec, shards):
    assert batch_shard_count(make_mesh(spec)) == shards


def test_check_batch_size_accepts_multiples():
    mesh = make_mesh("data:2,fsdp:2,tensor:2")  # 4 batch shards
    for b in (4, 8, 64):
        check_batch_size(b, mesh)
    check_batch_size(8, mesh, process_count=2)
    check_batch_size(6, make_mesh("data:2,tensor:4"))  # tensor does not split the batch


def test_check_batch_size_not_divisible_names_shards_and_fix():
    mesh = make_mesh("data:4,fsdp:2")
    with pytest.raises(ValueError) as e:
        check_batch_size(12, mesh)
    msg = str(e.value)
    assert "batch_size=12" in msg
    assert "8 batch shards" in msg
    assert "data=4" in msg and "fsdp=2" in msg
    assert "multiple of 8" in msg
    assert "16" in msg  # suggested nearest multiple: round(12/8)=2 -> 16

    with pytest.raises(ValueError) as e:
        check_batch_size(5, make_mesh("data:8"))
    assert "multiple of 8, e.g. 8" in str(e.value)


@pytest.mark.parametrize("bad", [0, -8])
def test_check_batch_size_non_positive(bad):
    with pytest.raises(ValueError, match=f"batch_size={bad}"):
        check_batch_size(bad, make_mesh("data:8"))


def test_check_batch_size_process_count():
    mesh = make_mesh("data:-1", devices=jax.devices()[:2])
    with pytest.raises(ValueError) as e:
        check_batch_size(4, mesh, process_count=3)
    assert "3 processes" in str(e.value) and "batch_size=4" in str(e.value)


# --------------------------------------------------------------------------- logical axes


def test_logical_to_mesh_default_rules():
    assert logical_to_mesh(("embed", "mlp")) == ("fsdp", "tensor")
    assert logical_to_mesh(("layers", "embed", "heads", "kv")) == (None, "fsdp", "tensor", None)
    assert logical_to_mesh(("vocab", "embed")) == ("tensor", "fsdp")
    assert logical_to_mesh(("batch", None)) == (("data", "fsdp"), None)
    assert logical_to_mesh(()) == ()


def test_logical_to_mesh_axis_used_twice_is_left_unsharded():
    # `heads` and `mlp` both want `tensor`: the second one stays unsharded.
    assert logical_to_mesh(("heads", "mlp")) == ("tensor", None)
    # `batch` takes data and fsdp, so `embed` (fsdp) cannot have it.
    assert logical_to_mesh(("batch", "embed", "mlp")) == (("data", "fsdp"), None, "tensor")
    assert logical_to_mesh(("embed", "batch")) == ("fsdp", None)  # batch overlaps on fsdp


def test_logical_to_mesh_custom_rules():
    rules = {"a": "data", "b": ("fsdp", "tensor"), "c": None}
    assert logical_to_mesh(("a", "b", "c"), rules) == ("data", ("fsdp", "tensor"), None)
    assert logical_to_mesh(("b", "a", "b"), rules) == (("fsdp", "tensor"), "data", None)


def test_logical_to_mesh_unknown_name():
    with pytest.raises(ValueError) as e:
        logical_to_mesh(("embed", "hidden"))
    msg = str(e.value)
    assert "'hidden'" in msg
    for known in DEFAULT_AXIS_RULES:
        assert known in msg


def test_default_rules_only_name_mesh_axes():
    for target in DEFAULT_AXIS_RULES.values():
        members = (target,) if isinstance(target, str) else tuple(target or ())
        assert set(members) <= set(M.MESH_AXES)
