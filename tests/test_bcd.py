"""BCD blocks, filter specs, cycles, phase plans and the first-run rule."""

import ast
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SemiParam, TinyMLP

from distributed.core import bcd
from distributed.core.bcd import (
    CYCLES,
    Phase,
    check_blocks,
    complete_filter,
    enter_phase,
    make_phase_plan,
    model_blocks,
    nonparam_filter,
    param_filter,
    phase_at,
    phase_boundaries,
    single_phase_plan,
    union,
)

FIELDS = ("coeff_mat", "S_mat", "alpha_mat", "basis_scale")


@pytest.fixture(scope="module")
def semi():
    return SemiParam(n_in=3, n_feat=8, n_out=2, key=jax.random.key(0))


@pytest.fixture(scope="module")
def semi_abstract():
    return eqx.filter_eval_shape(lambda: SemiParam(n_in=3, n_feat=8, n_out=2,
                                                   key=jax.random.key(0)))


def _flags(spec):
    return {f: getattr(spec, f) for f in FIELDS}


class Unnamed(eqx.Module):
    """No named blocks; an int array, a non-array leaf and a nested module."""

    w: jax.Array
    steps: jax.Array
    act: object
    inner: eqx.nn.Linear

    def __init__(self, key):
        self.w = jnp.ones((3, 2))
        self.steps = jnp.arange(3)
        self.act = jax.nn.relu
        self.inner = eqx.nn.Linear(2, 2, key=key)


class Nested(eqx.Module):
    """Blocks that are whole sub-modules, with a non-trainable int array inside one."""

    head: eqx.nn.Linear
    body: tuple
    counter: jax.Array
    param_fields = ("head",)
    nonparam_fields = ("body",)

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.head = eqx.nn.Linear(2, 2, key=k1)
        self.body = (eqx.nn.Linear(2, 3, key=k2), jnp.arange(4))
        self.counter = jnp.zeros(())


# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize("which", ["concrete", "abstract"])
def test_named_block_filters(semi, semi_abstract, which):
    model = semi if which == "concrete" else semi_abstract
    if which == "abstract":
        assert isinstance(model.coeff_mat, jax.ShapeDtypeStruct)
    p, n, c = param_filter(model), nonparam_filter(model), complete_filter(model)
    assert _flags(p) == {"coeff_mat": True, "S_mat": False, "alpha_mat": False,
                         "basis_scale": False}
    assert _flags(n) == {"coeff_mat": False, "S_mat": True, "alpha_mat": True,
                         "basis_scale": False}
    assert _flags(c) == {"coeff_mat": True, "S_mat": True, "alpha_mat": True,
                         "basis_scale": False}
    for spec in (p, n, c):
        assert jax.tree.structure(spec) == jax.tree.structure(model)
        assert all(type(x) is bool for x in jax.tree.leaves(spec))
    blocks = model_blocks(model)
    assert set(blocks) == {"param", "nonparam"}
    assert _flags(blocks["param"]) == _flags(p) and _flags(blocks["nonparam"]) == _flags(n)


def test_filters_partition_the_model(semi):
    trainable, frozen = eqx.partition(semi, complete_filter(semi))
    assert frozen.basis_scale is semi.basis_scale
    assert trainable.basis_scale is None
    picked = eqx.filter(semi, param_filter(semi))
    assert picked.coeff_mat is semi.coeff_mat
    assert picked.S_mat is None and picked.alpha_mat is None


def test_filters_on_nested_blocks():
    m = eqx.filter_eval_shape(lambda: Nested(jax.random.key(0)))
    p, n, c = param_filter(m), nonparam_filter(m), complete_filter(m)
    assert (p.head.weight, p.head.bias, p.body[0].weight, p.counter) == (True, True, False, False)
    # The int array inside `body` is never a parameter.
    assert (n.head.weight, n.body[0].weight, n.body[0].bias, n.body[1]) == (
        False, True, True, False)
    assert (c.head.weight, c.body[0].bias, c.body[1], c.counter) == (True, True, False, False)
    check_blocks(m, model_blocks(m))


@pytest.mark.parametrize("which", ["concrete", "abstract"])
def test_unnamed_model_complete_is_all_float_arrays(which):
    make = lambda: Unnamed(jax.random.key(0))  # noqa: E731
    m = make() if which == "concrete" else eqx.filter_eval_shape(make)
    c = complete_filter(m)
    assert c.w is True and c.inner.weight is True and c.inner.bias is True
    assert c.steps is False  # integer array
    assert c.act is False  # function leaf
    mlp = eqx.filter_eval_shape(lambda: TinyMLP((2, 4, 1), key=jax.random.key(1)))
    leaves = jax.tree.leaves(complete_filter(mlp))
    assert leaves == [True] * 4


@pytest.mark.parametrize("fn", [param_filter, nonparam_filter, model_blocks])
def test_unnamed_model_param_filter_raises_clear_error(fn):
    m = eqx.filter_eval_shape(lambda: TinyMLP((2, 4, 1), key=jax.random.key(1)))
    with pytest.raises(ValueError) as e:
        fn(m)
    msg = str(e.value)
    assert "TinyMLP" in msg
    assert "param_fields" in msg and "nonparam_fields" in msg
    assert "filter spec" in msg


def test_named_field_that_does_not_exist():
    class Bad(eqx.Module):
        a: jax.Array
        param_fields = ("a", "nope")
        nonparam_fields = ()

    with pytest.raises(ValueError) as e:
        param_filter(Bad(jnp.ones(2)))
    assert "['nope']" in str(e.value) and "Bad" in str(e.value)


def test_union(semi):
    u = union(param_filter(semi), nonparam_filter(semi))
    assert _flags(u) == _flags(complete_filter(semi))
    assert _flags(union(param_filter(semi))) == _flags(param_filter(semi))


# --------------------------------------------------------------------------- check_blocks


@pytest.mark.parametrize("which", ["concrete", "abstract"])
def test_check_blocks_ok(semi, semi_abstract, which):
    m = semi if which == "concrete" else semi_abstract
    check_blocks(m, model_blocks(m))
    check_blocks(m, {"all": complete_filter(m)})
    check_blocks(m, {"one": param_filter(m), "two": nonparam_filter(m)})


def test_check_blocks_overlap(semi):
    with pytest.raises(ValueError) as e:
        check_blocks(semi, {"a": param_filter(semi), "b": complete_filter(semi)})
    msg = str(e.value)
    assert ".coeff_mat" in msg and "'a'" in msg and "'b'" in msg and "disjoint" in msg
    with pytest.raises(ValueError, match=r"\.S_mat"):
        check_blocks(semi, {"x": nonparam_filter(semi), "y": nonparam_filter(semi)})


def test_check_blocks_empty(semi):
    nothing = jax.tree.map(lambda _: False, semi)
    with pytest.raises(ValueError) as e:
        check_blocks(semi, {"param": param_filter(semi), "empty": nothing})
    assert "'empty'" in str(e.value) and "no arrays" in str(e.value)
    # A block that only selects an integer array selects no parameters either.
    m = eqx.filter_eval_shape(lambda: Unnamed(jax.random.key(0)))
    ints = jax.tree.map(lambda _: False, m)
    ints = eqx.tree_at(lambda t: t.steps, ints, True)
    with pytest.raises(ValueError, match="'ints'"):
        check_blocks(m, {"ints": ints})


# --------------------------------------------------------------------------- phase plans


def _summary(plan):
    return [(p.name, p.blocks, p.epochs) for p in plan]


PARAM = ("param",)
NONPARAM = ("nonparam",)
BOTH = ("param", "nonparam")


@pytest.mark.parametrize(
    "cycle, expected",
    [
        ("parametric", [("parametric", PARAM, 2), ("non-parametric", NONPARAM, 3)]),
        ("non-parametric", [("non-parametric", NONPARAM, 3), ("parametric", PARAM, 2)]),
        ("complete", [("parametric", PARAM, 2), ("non-parametric", NONPARAM, 3),
                      ("complete", BOTH, 5)]),
        ("only-parametric", [("parametric", PARAM, 2)]),
        ("only-non-parametric", [("non-parametric", NONPARAM, 3)]),
    ],
)
def test_make_phase_plan_cycles(cycle, expected):
    plan = make_phase_plan(cycle, epochs_param=2, epochs_nonparam=3, epochs_complete=5)
    assert isinstance(plan, tuple) and all(isinstance(p, Phase) for p in plan)
    assert _summary(plan) == expected
    assert not any(p.zero_alpha_on_enter or p.identity_alpha_on_exit for p in plan)


def test_all_cycles_are_covered():
    assert set(CYCLES) == {"parametric", "non-parametric", "complete", "only-parametric",
                           "only-non-parametric"}


def test_zero_epoch_phases_are_dropped():
    plan = make_phase_plan("complete", epochs_param=0, epochs_nonparam=3, epochs_complete=4)
    assert _summary(plan) == [("non-parametric", NONPARAM, 3), ("complete", BOTH, 4)]
    plan = make_phase_plan("complete", epochs_param=1, epochs_nonparam=2)  # complete defaults 0
    assert _summary(plan) == [("parametric", PARAM, 1), ("non-parametric", NONPARAM, 2)]
    plan = make_phase_plan("parametric", epochs_param=1, epochs_nonparam=0, epochs_complete=9)
    assert _summary(plan) == [("parametric", PARAM, 1)]


def test_numpy_integer_epochs_are_accepted():
    plan = make_phase_plan("complete", epochs_param=np.int64(2), epochs_nonparam=np.int32(0),
                           epochs_complete=np.int64(1))
    assert _summary(plan) == [("parametric", PARAM, 2), ("complete", BOTH, 1)]
    assert all(type(p.epochs) is int for p in plan)


def test_plan_with_no_epochs_is_an_error():
    with pytest.raises(ValueError, match="'only-parametric'"):
        make_phase_plan("only-parametric", epochs_param=0, epochs_nonparam=5)


def test_unknown_cycle_lists_valid_names():
    with pytest.raises(ValueError) as e:
        make_phase_plan("parametrc", epochs_param=1, epochs_nonparam=1)
    msg = str(e.value)
    assert "'parametrc'" in msg
    for name in CYCLES:
        assert f"'{name}'" in msg


@pytest.mark.parametrize(
    "kwargs, bad, phase",
    [
        (dict(epochs_param=-1, epochs_nonparam=2), "-1", "parametric"),
        (dict(epochs_param=1, epochs_nonparam=-3), "-3", "non-parametric"),
        (dict(epochs_param=1, epochs_nonparam=1, epochs_complete=-2), "-2", "complete"),
        (dict(epochs_param=1.5, epochs_nonparam=1), "1.5", "parametric"),
        (dict(epochs_param=1, epochs_nonparam=True), "True", "non-parametric"),
        (dict(epochs_param=1, epochs_nonparam=1, epochs_complete="2"), "'2'", "complete"),
    ],
)
def test_bad_epochs(kwargs, bad, phase):
    with pytest.raises(ValueError) as e:
        make_phase_plan("complete", **kwargs)
    assert bad in str(e.value) and f"the {phase} phase" in str(e.value)


@pytest.mark.parametrize(
    "cycle, flags",
    [
        ("parametric", [True, False]),
        ("complete", [True, False, False]),
        ("only-parametric", [True]),
        ("non-parametric", [False, False]),  # the parametric phase does not open the cycle
        ("only-non-parametric", [False]),
    ],
)
def test_first_run_flags_only_on_opening_parametric_phase(cycle, flags):
    plan = make_phase_plan(cycle, epochs_param=1, epochs_nonparam=1, epochs_complete=1,
                           first_run=True)
    assert [p.zero_alpha_on_enter for p in plan] == flags
    assert [p.identity_alpha_on_exit for p in plan] == flags
    plan = make_phase_plan(cycle, epochs_param=1, epochs_nonparam=1, epochs_complete=1)
    assert not any(p.zero_alpha_on_enter or p.identity_alpha_on_exit for p in plan)


def test_first_run_with_parametric_phase_dropped():
    plan = make_phase_plan("complete", epochs_param=0, epochs_nonparam=1, epochs_complete=1,
                           first_run=True)
    assert [p.name for p in plan] == ["non-parametric", "complete"]
    assert not any(p.zero_alpha_on_enter or p.identity_alpha_on_exit for p in plan)


def test_single_phase_plan():
    assert single_phase_plan(3) == (Phase("train", ("all",), 3),)
    assert single_phase_plan(2, ("a", "b"))[0].blocks == ("a", "b")
    with pytest.raises(ValueError, match="epochs=0"):
        single_phase_plan(0)


# --------------------------------------------------------------------------- boundaries


@pytest.fixture
def plan235():
    return make_phase_plan("complete", epochs_param=2, epochs_nonparam=3, epochs_complete=4)


def test_phase_boundaries(plan235):
    assert phase_boundaries(plan235, 5) == [0, 10, 25, 45]
    assert phase_boundaries(plan235, 1) == [0, 2, 5, 9]
    assert phase_boundaries(single_phase_plan(3), 7) == [0, 21]


@pytest.mark.parametrize(
    "step, phase",
    [(0, 0), (9, 0), (10, 1), (11, 1), (24, 1), (25, 2), (44, 2), (45, 2), (1000, 2)],
)
def test_phase_at(plan235, step, phase):
    assert phase_at(plan235, step, 5) == phase


def test_phase_at_single_epoch_phases():
    plan = make_phase_plan("parametric", epochs_param=1, epochs_nonparam=1)
    assert [phase_at(plan, s, 1) for s in range(4)] == [0, 1, 1, 1]


# --------------------------------------------------------------------------- first-run rule


def _alpha(m):
    return np.asarray(m.alpha_mat)


def test_enter_phase_first_run(semi):
    plan = make_phase_plan("complete", epochs_param=1, epochs_nonparam=1, epochs_complete=1,
                           first_run=True)
    ident = np.full((8, 2), 1 / 8, np.float32)
    start = eqx.tree_at(lambda m: m.alpha_mat, semi, jnp.full((8, 2), 0.7))

    m0 = enter_phase(start, plan, -1, 0)  # entering the first (parametric) phase: zero
    np.testing.assert_array_equal(_alpha(m0), np.zeros((8, 2)))
    for f in ("coeff_mat", "S_mat", "basis_scale"):
        assert getattr(m0, f) is getattr(semi, f)

    assert enter_phase(m0, plan, 0, 0) is m0  # same phase: no-op (no re-zeroing either)

    m1 = enter_phase(m0, plan, 0, 1)  # leaving it: identity
    np.testing.assert_allclose(_alpha(m1), ident)
    assert m1.coeff_mat is semi.coeff_mat and m1.S_mat is semi.S_mat

    m2 = enter_phase(m1, plan, 1, 2)  # later transitions: untouched
    assert m2 is m1
    assert enter_phase(m2, plan, 2, 2) is m2


def test_enter_phase_without_first_run_is_identity(semi):
    plan = make_phase_plan("complete", epochs_param=1, epochs_nonparam=1, epochs_complete=1)
    m = semi
    for prev, cur in [(-1, 0), (0, 1), (1, 2)]:
        assert enter_phase(m, plan, prev, cur) is m
    # first_run but the cycle opens with the non-parametric phase: nothing to do either.
    plan = make_phase_plan("non-parametric", epochs_param=1, epochs_nonparam=1, first_run=True)
    assert enter_phase(semi, plan, -1, 0) is semi
    assert enter_phase(semi, plan, 0, 1) is semi


def test_enter_phase_model_without_methods():
    plan = make_phase_plan("parametric", epochs_param=1, epochs_nonparam=1, first_run=True)
    m = eqx.filter_eval_shape(lambda: TinyMLP((2, 4, 1), key=jax.random.key(1)))
    with pytest.raises(ValueError) as e:
        enter_phase(m, plan, -1, 0)
    msg = str(e.value)
    assert "TinyMLP.set_alpha_zero()" in msg and "first_run=False" in msg
    with pytest.raises(ValueError, match=r"TinyMLP\.set_alpha_identity\(\)"):
        enter_phase(m, plan, 0, 1)
    # Without first_run the same model goes through every transition.
    plain = make_phase_plan("parametric", epochs_param=1, epochs_nonparam=1)
    assert enter_phase(m, plain, -1, 0) is m and enter_phase(m, plain, 0, 1) is m


# --------------------------------------------------------------------------- layering


def test_bcd_imports_only_core_modules():
    tree = ast.parse(pathlib.Path(bcd.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level in (0, 1) and not (node.module or "").startswith("distributed")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("distributed") for a in node.names)
