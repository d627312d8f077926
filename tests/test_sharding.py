"""PartitionSpec rules (replicate / fsdp / tensor), sharded init, shard/abstract helpers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import TinyMLP, assert_trees_equal
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from distributed.core import sharding as S
from distributed.core.mesh import make_mesh
from distributed.core.state import create_state


@pytest.fixture(scope="module")
def meshes():
    return {s: make_mesh(s) for s in
            ("data:8", "fsdp:8", "data:2,fsdp:4", "data:2,tensor:4", "fsdp:2,tensor:4")}


def spec(path, shape, mesh, **kw):
    return S.leaf_spec(path, shape, mesh, **kw)


# --------------------------------------------------------------------------- fsdp rule


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((64, 128), P(None, "fsdp")),  # largest divisible dimension
        ((128, 64), P("fsdp")),
        ((128, 128), P("fsdp")),  # tie -> the first
        ((4, 64, 64), P(None, "fsdp")),  # tie between dims 1 and 2 -> dim 1
        ((1026, 512), P(None, "fsdp")),  # 1026 is larger but not divisible by 4
        ((6, 10, 1000), P(None, None, "fsdp")),
        ((1000, 6, 10), P("fsdp")),
        ((3, 4096), P(None, "fsdp")),
        ((1025, 3), P()),  # nothing divisible -> replicated
        ((4096,), P("fsdp")),
        ((4098,), P()),
    ],
)
def test_fsdp_largest_divisible_dim(meshes, shape, expected):
    mesh = meshes["data:2,fsdp:4"]  # fsdp size 4
    assert spec(".w", shape, mesh, min_fsdp_size=1) == expected
    # Default strategy "auto" and explicit "fsdp" agree on a mesh without tensor parallelism.
    assert spec(".w", shape, mesh, min_fsdp_size=1, strategy="fsdp") == expected


def test_fsdp_min_size(meshes):
    mesh = meshes["fsdp:8"]
    assert spec(".w", (16, 16), mesh) == P()  # 256 < default 1024 -> replicated
    assert spec(".w", (32, 32), mesh) == P("fsdp")  # exactly 1024 -> sharded
    assert spec(".w", (32, 31), mesh) == P()  # 992 < 1024
    assert spec(".w", (32, 31), mesh, min_fsdp_size=992) == P("fsdp")
    assert spec(".w", (32, 31), mesh, min_fsdp_size=993) == P()
    assert spec(".w", (16, 16), mesh, min_fsdp_size=1) == P("fsdp")
    assert spec(".w", (16, 16), mesh, min_fsdp_size=257) == P()
    assert spec(".w", (), mesh, min_fsdp_size=0) == P()  # scalars stay replicated


def test_no_sharding_on_pure_data_mesh(meshes):
    mesh = meshes["data:8"]
    for path, shape in [(".w", (1024, 1024)), (".layers[0].weight", (64, 64)),
                        (".blocks.wq", (2, 64, 8, 8))]:
        assert spec(path, shape, mesh, min_fsdp_size=1) == P()


# --------------------------------------------------------------------------- tensor rules


@pytest.mark.parametrize(
    "path, shape, expected",
    [
        (".layers[0].weight", (32, 8), P("tensor")),  # column parallel: out features
        (".layers[0].bias", (32,), P("tensor")),
        (".layers[1].weight", (32, 32), P(None, "tensor")),  # row parallel: in features
        (".layers[1].bias", (32,), P()),  # row-parallel bias is replicated
        (".layers[2].weight", (8, 32), P("tensor")),
        (".layers[2].weight", (2, 32), P()),  # 2 output features: not divisible by 4
        (".layers[10].weight", (16, 16), P("tensor")),
        (".layers[11].weight", (16, 16), P(None, "tensor")),
        (".layers[1].weight", (3, 32, 32), P()),  # rank mismatch: no rule applies
        (".other.weight", (32, 32), P()),
        (".mlp.layers[0].weight", (32, 8), P("tensor")),  # nested module
    ],
)
def test_tensor_rules_mlp(meshes, path, shape, expected):
    mesh = meshes["data:2,tensor:4"]
    assert spec(path, shape, mesh, min_fsdp_size=1) == expected
    assert spec(path, shape, mesh, min_fsdp_size=1, strategy="tensor") == expected


@pytest.mark.parametrize(
    "path, shape, expected",
    [
        # (layers, d_model, heads, head_dim): heads on tensor, fsdp on the largest remaining.
        (".blocks.wq", (2, 64, 8, 16), P(None, "fsdp", "tensor")),
        (".blocks.wk", (2, 64, 8, 16), P(None, "fsdp", "tensor")),
        (".blocks.wv", (2, 64, 8, 16), P(None, "fsdp", "tensor")),
        # heads not divisible by tensor=4: no tensor split, fsdp still applies.
        (".blocks.wq", (2, 64, 6, 16), P(None, "fsdp")),
        # (layers, heads, head_dim, d_model)
        (".blocks.wo", (2, 8, 16, 64), P(None, "tensor", None, "fsdp")),
        # (layers, d_model, d_ff)
        (".blocks.w_in", (2, 64, 256), P(None, "fsdp", "tensor")),
        (".blocks.w_out", (2, 256, 64), P(None, "tensor", "fsdp")),
        # (vocab, d_model) / (d_model, vocab)
        (".embed", (1000, 64), P("tensor", "fsdp")),
        (".embed", (1001, 64), P(None, "fsdp")),
        (".unembed", (64, 1000), P("fsdp", "tensor")),
        (".pos_embed", (128, 64), P("fsdp")),  # not an embedding rule: fsdp only, ties -> first
        (".blocks.attn_norm", (2, 64), P(None, "fsdp")),
    ],
)
def test_tensor_rules_transformer_with_fsdp(meshes, path, shape, expected):
    mesh = meshes["fsdp:2,tensor:4"]
    assert spec(path, shape, mesh, min_fsdp_size=1) == expected


def test_transformer_rank3_wq_is_not_matched(meshes):
    # A rule only applies when its logical axes have the leaf's rank.
    mesh = meshes["data:2,tensor:4"]
    assert spec(".blocks.wq", (64, 8, 16), mesh, min_fsdp_size=1) == P()


def test_strategies(meshes):
    mesh = meshes["fsdp:2,tensor:4"]
    path, shape = ".blocks.wq", (2, 64, 8, 16)
    assert spec(path, shape, mesh, min_fsdp_size=1, strategy="auto") == P(None, "fsdp", "tensor")
    assert spec(path, shape, mesh, min_fsdp_size=1, strategy="fsdp") == P(None, "fsdp")
    assert spec(path, shape, mesh, min_fsdp_size=1, strategy="tensor") == P(None, None, "tensor")
    assert spec(path, shape, mesh, min_fsdp_size=1, strategy="replicate") == P()


def test_replicate_strategy_replicates_everything(meshes):
    model = eqx.filter_eval_shape(lambda: TinyMLP((8, 64, 64, 8), key=jax.random.key(0)))
    for name in ("fsdp:8", "data:2,tensor:4", "fsdp:2,tensor:4"):
        specs = S.tree_specs(model, meshes[name], strategy="replicate", min_fsdp_size=1)
        leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
        assert len(leaves) == 6 and all(s == P() for s in leaves)


def test_unknown_strategy(meshes):
    with pytest.raises(ValueError) as e:
        spec(".w", (8, 8), meshes["fsdp:8"], strategy="zero3")
    msg = str(e.value)
    assert "'zero3'" in msg
    for s in S.STRATEGIES:
        assert s in msg
    with pytest.raises(ValueError, match="zero3"):
        S.tree_specs({"w": jnp.zeros((8, 8))}, meshes["fsdp:8"], strategy="zero3")


def test_custom_rules(meshes):
    mesh = meshes["data:2,tensor:4"]
    rules = [(r"\.proj$", (None, "mlp")), (r"\.proj$", ("mlp", None))]  # first match wins
    assert spec(".proj", (8, 8), mesh, rules=rules) == P(None, "tensor")
    assert spec(".layers[0].weight", (8, 8), mesh, rules=rules) == P()  # defaults not used


# --------------------------------------------------------------------------- trees


def test_optimizer_moments_get_the_parameter_spec(meshes):
    mesh = meshes["fsdp:2,tensor:4"]

    def make():
        model = TinyMLP((8, 32, 64, 4), key=jax.random.key(0))
        blocks = {"all": jax.tree.map(eqx.is_inexact_array, model)}
        return create_state(model, {"all": optax.adam(1e-3)}, blocks, key=jax.random.key(1))

    state = eqx.filter_eval_shape(make)  # specs depend on shapes only
    specs = S.tree_specs(state, mesh, min_fsdp_size=1)
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, P))}
    assert ".opt_state['all'][0].mu.layers[0].weight" in flat
    for i in range(3):
        for kind in ("weight", "bias"):
            param = flat[f".model.layers[{i}].{kind}"]
            assert flat[f".opt_state['all'][0].mu.layers[{i}].{kind}"] == param
            assert flat[f".opt_state['all'][0].nu.layers[{i}].{kind}"] == param
    # Hand-computed: layer0 (32, 8) column -> tensor on 32, fsdp on 8; layer1 (64, 32) row ->
    # tensor on 32, fsdp on 64; layer2 (4, 64) column -> tensor on 4, fsdp on 64.
    assert flat[".model.layers[0].weight"] == P("tensor", "fsdp")
    assert flat[".model.layers[1].weight"] == P("fsdp", "tensor")
    assert flat[".model.layers[2].weight"] == P("tensor", "fsdp")
    assert flat[".model.layers[0].bias"] == P("tensor")
    assert flat[".model.layers[1].bias"] == P("fsdp")
    assert flat[".step"] == P() and flat[".phase"] == P()
    assert flat[".opt_state['all'][0].count"] == P()


def test_tree_specs_non_array_leaves_are_none(meshes):
    mlp = eqx.filter_eval_shape(_mlp)
    specs = S.tree_specs(mlp, meshes["data:2,tensor:4"])
    assert specs.activation is None and specs.final_activation is None
    assert specs.layers[0].weight == P("tensor")
    sh = S.tree_shardings(mlp, meshes["data:2,tensor:4"])
    assert sh.activation is None
    assert isinstance(sh.layers[0].weight, NamedSharding)
    assert sh.layers[0].weight.spec == P("tensor")
    assert sh.layers[0].weight.mesh == meshes["data:2,tensor:4"]


def test_tree_specs_on_abstract_and_numpy_leaves(meshes):
    mesh = meshes["fsdp:8"]
    tree = {"a": np.zeros((16, 8), np.float32), "b": jax.ShapeDtypeStruct((8, 24), jnp.float32),
            "c": 3, "d": "x"}
    specs = S.tree_specs(tree, mesh, min_fsdp_size=1)
    assert specs == {"a": P("fsdp"), "b": P(None, "fsdp"), "c": None, "d": None}


# --------------------------------------------------------------------------- sharded init


MLP_ARGS = dict(in_size=8, out_size=4, width_size=32, depth=2)


def _mlp():
    return eqx.nn.MLP(**MLP_ARGS, key=jax.random.key(3))


@pytest.fixture(scope="module")
def ref_mlp():
    return _mlp()  # the unsharded reference, built eagerly on the default device


_INITS = {}


def _init(mesh):
    """`sharded_init(_mlp, mesh)` once per mesh, recording the jit calls and how `fn` ran."""
    key = tuple(mesh.shape.items())
    if key not in _INITS:
        calls, traced = [], []
        real_jit = jax.jit

        def spy_jit(fn, **kw):
            calls.append(kw)
            return real_jit(fn, **kw)

        def fn():
            m = _mlp()
            traced.append(isinstance(m.layers[0].weight, jax.core.Tracer))
            return m

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(S.jax, "jit", spy_jit)
            out, sh = S.sharded_init(fn, mesh, min_fsdp_size=1)
        _INITS[key] = out, sh, [c for c in calls if "out_shardings" in c], traced
    return _INITS[key]


@pytest.mark.parametrize(
    "mesh_name, expected",
    [
        # layer shapes: (32, 8), (32,), (32, 32), (32,), (4, 32), (4,)
        ("fsdp:8", [P("fsdp"), P("fsdp"), P("fsdp"), P("fsdp"), P(None, "fsdp"), P()]),
        ("fsdp:2,tensor:4", [P("tensor", "fsdp"), P("tensor"), P("fsdp", "tensor"), P("fsdp"),
                             P("tensor", "fsdp"), P("tensor")]),
    ],
)
def test_sharded_init(meshes, ref_mlp, mesh_name, expected):
    mesh = meshes[mesh_name]
    ref = ref_mlp
    out, sh, _, _ = _init(mesh)
    # Non-array leaves survive; values equal the unsharded init.
    assert out.activation is ref.activation and out.final_activation is ref.final_activation
    assert jax.tree.structure(out) == jax.tree.structure(ref)
    assert_trees_equal(out, ref)
    # Every array is laid out as requested, and the requested layout is the rule's.
    arrays = jax.tree.leaves(eqx.filter(out, eqx.is_array))
    shardings = jax.tree.leaves(sh)
    assert len(arrays) == len(shardings) == 6
    for a, s, e in zip(arrays, shardings, expected, strict=True):
        assert s.spec == e
        assert a.sharding == s, (a.sharding, s)
    assert sh == S.tree_shardings(ref, mesh, min_fsdp_size=1)
    assert sh.activation is None and sh.final_activation is None
    # Each device holds only its shard (e.g. 1/8 of layer 0 on fsdp:8) ...
    w0 = out.layers[0].weight
    expected_shape = {"fsdp:8": (4, 8), "fsdp:2,tensor:4": (8, 4)}
    assert {s.data.shape for s in w0.addressable_shards} == {expected_shape[mesh_name]}
    # ... and it is the matching block of the reference.
    for s in w0.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data),
                                      np.asarray(ref.layers[0].weight)[s.index])


@pytest.mark.parametrize("mesh_name", ["fsdp:8", "fsdp:2,tensor:4"])
def test_sharded_init_output_shardings_come_from_jit(meshes, mesh_name):
    """The init is one jit whose out_shardings are the requested ones (no host copy first)."""
    out, sh, calls, traced = _init(meshes[mesh_name])
    assert len(calls) == 1
    requested = [s for s in jax.tree.leaves(calls[0]["out_shardings"])]
    assert requested == jax.tree.leaves(sh)
    # fn only ever ran traced (eval_shape + jit): never eagerly on the host.
    assert traced and all(traced)


def test_sharded_init_strategy_kwargs_and_non_array_leaves(meshes):
    mesh = meshes["fsdp:8"]
    fn = lambda: {"w": jnp.arange(64.0).reshape(8, 8), "act": jax.nn.relu, "n": 3}  # noqa: E731
    out, sh = S.sharded_init(fn, mesh, strategy="replicate", min_fsdp_size=1)
    assert out["act"] is jax.nn.relu and out["n"] == 3
    assert sh["act"] is None and sh["n"] is None
    assert out["w"].sharding == NamedSharding(mesh, P()) and out["w"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(64.0).reshape(8, 8))


# --------------------------------------------------------------------------- shard / abstract


def test_shard(meshes, ref_mlp):
    mesh = meshes["fsdp:2,tensor:4"]
    ref = ref_mlp
    sh = S.tree_shardings(ref, mesh, min_fsdp_size=1)
    out = S.shard(ref, sh)
    assert out.activation is ref.activation
    assert_trees_equal(out, ref)
    assert out.layers[0].weight.sharding.spec == P("tensor", "fsdp")
    for a, s in zip(jax.tree.leaves(eqx.filter(out, eqx.is_array)), jax.tree.leaves(sh),
                    strict=True):
        assert a.sharding == s
    # numpy leaves become sharded jax arrays; other leaves are kept.
    tree = {"x": np.arange(64, dtype=np.float32).reshape(16, 4), "n": 7}
    out = S.shard(tree, {"x": NamedSharding(mesh, P("fsdp")), "n": None})
    assert isinstance(out["x"], jax.Array) and out["n"] == 7
    assert out["x"].sharding.spec == P("fsdp")
    np.testing.assert_array_equal(np.asarray(out["x"]), tree["x"])


def test_abstract(meshes, ref_mlp):
    mesh = meshes["fsdp:8"]
    ref = ref_mlp
    a = S.abstract(ref)
    assert a.activation is ref.activation
    w = a.layers[0].weight
    assert isinstance(w, jax.ShapeDtypeStruct)
    assert w.shape == (32, 8) and w.dtype == jnp.float32 and w.sharding is None

    sh = S.tree_shardings(ref, mesh, min_fsdp_size=1)
    a = S.abstract(ref, sh)
    assert a.layers[0].weight.sharding == NamedSharding(mesh, P("fsdp"))
    assert a.layers[2].bias.sharding == NamedSharding(mesh, P())
    assert a.final_activation is ref.final_activation
    # Also from an eval_shape tree (no arrays ever built).
    a2 = S.abstract(eqx.filter_eval_shape(_mlp), sh)
    is_sds = lambda v: isinstance(v, jax.ShapeDtypeStruct)  # noqa: E731
    assert len(jax.tree.leaves(eqx.filter(a2, is_sds))) == 6
    pairs = zip(jax.tree.leaves(eqx.filter(a, is_sds)), jax.tree.leaves(eqx.filter(a2, is_sds)),
                strict=True)
    for x, y in pairs:
        assert (x.shape, x.dtype, x.sharding) == (y.shape, y.dtype, y.sharding)


# --------------------------------------------------------------------------- batches, bytes


def test_batch_spec(meshes):
    assert S.batch_spec(meshes["data:8"]) == P(("data", "fsdp"))
    assert S.batch_spec(meshes["data:2,tensor:4"]) == P(("data", "fsdp"))
    data_only = Mesh(np.array(jax.devices()), ("data",))
    assert S.batch_spec(data_only) == P(("data",))
    dt = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "tensor"))
    assert S.batch_spec(dt) == P(("data",))
    m8 = meshes["data:8"]
    assert S.batch_sharding(m8) == NamedSharding(m8, P(("data", "fsdp")))


def test_batch_sharding_places_rows(meshes):
    mesh = make_mesh("data:2,fsdp:2,tensor:2")  # 4 batch shards, each on 2 tensor devices
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    arr = jax.device_put(x, S.batch_sharding(mesh))
    # device id = 4*i + 2*j + k at mesh position (data=i, fsdp=j, tensor=k): batch shard 2i+j.
    for s in arr.addressable_shards:
        shard_idx = s.device.id // 2
        np.testing.assert_array_equal(np.asarray(s.data), x[4 * shard_idx: 4 * shard_idx + 4])
    data_only = Mesh(np.array(jax.devices()), ("data",))
    arr = jax.device_put(x, S.batch_sharding(data_only))
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 3)}


def test_replicated(meshes):
    r = S.replicated(meshes["fsdp:8"])
    assert r.spec == P() and r.is_fully_replicated


def test_addressable_bytes(meshes, ref_mlp):
    mesh = meshes["fsdp:8"]
    x = jnp.ones((64, 128), jnp.float32)  # 32768 bytes
    rep = jax.device_put(x, S.replicated(mesh))
    fs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
    assert S.addressable_bytes(rep) == 64 * 128 * 4
    assert S.addressable_bytes(fs) == 64 * 128 * 4 // 8
    assert S.addressable_bytes(rep) == 8 * S.addressable_bytes(fs)
    # Trees: non-arrays ignored, leaves summed.
    tree = {"a": rep, "b": fs, "f": jax.nn.relu, "n": 3}
    assert S.addressable_bytes(tree) == 32768 + 4096
    # A model sharded by the rules on fsdp:8 (min size 1) holds 1/8 of every divisible array.
    ref = ref_mlp
    out, _, _, _ = _init(mesh)
    # shapes (32,8),(32,),(32,32),(32,),(4,32),(4,): all but the last bias split 8 ways.
    full = (32 * 8 + 32 + 32 * 32 + 32 + 4 * 32) * 4
    assert S.addressable_bytes(out) == full // 8 + 4 * 4
    assert S.addressable_bytes(ref) == full + 16
