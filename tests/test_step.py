"""The sharded step: equivalence with the single-device step, shard_map twin, BCD semantics."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    SemiParam,
    TinyMLP,
    arrays,
    assert_trees_allclose,
    assert_trees_equal,
    mse,
    regression_data,
)

from distributed.core import bcd, sharding
from distributed.core.mesh import make_mesh
from distributed.core.state import init_state
from distributed.core.step import StepOptions, TrainStep
from distributed.seeds import make_step

MESHES = ["data:8", "data:4,fsdp:2", "fsdp:8", "data:2,tensor:4"]


def _setup(model_fn, mesh, blocks_fn, optimizers, options=None, n=64):
    key = jax.random.key(0)
    state, sh = init_state(model_fn, optimizers, blocks_fn, key=key, mesh=mesh, min_fsdp_size=1)
    step = TrainStep(mse, optimizers, blocks_fn(state.model), mesh=mesh, state_shardings=sh,
                     options=options or StepOptions())
    data = regression_data(n)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in data.items()}
    return state, step, batch


def _run(model_fn, mesh_spec, phases, devices=None, options=None, two_blocks=True):
    mesh = make_mesh(mesh_spec, devices)
    if two_blocks:
        opts = {"param": optax.adam(1e-2), "nonparam": optax.adam(3e-3)}
        blocks_fn = bcd.model_blocks
    else:
        opts = {"all": optax.adam(1e-2)}
        blocks_fn = lambda m: {"all": bcd.complete_filter(m)}
    state, step, batch = _setup(model_fn, mesh, blocks_fn, opts, options)
    losses = []
    for active in phases:
        state, m = step(state, batch, active)
        losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_step_equals_single_device_semiparametric(mesh_spec):
    model_fn = lambda: SemiParam(n_feat=16, key=jax.random.key(1))
    phases = [("param",), ("nonparam",), ("param", "nonparam"), ("param", "nonparam")]
    ref, ref_losses = _run(model_fn, "data:1", phases, devices=jax.devices()[:1])
    out, losses = _run(model_fn, mesh_spec, phases)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_allclose(out.model, ref.model, rtol=1e-5, atol=1e-6)
    assert_trees_allclose(out.opt_state, ref.opt_state, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_sharded_step_equals_single_device_mlp(mesh_spec):
    model_fn = lambda: TinyMLP((4, 32, 32, 2), key=jax.random.key(2))
    phases = [("all",)] * 3
    ref, ref_losses = _run(model_fn, "data:1", phases, jax.devices()[:1], two_blocks=False)
    out, losses = _run(model_fn, mesh_spec, phases, two_blocks=False)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_trees_allclose(out.model, ref.model, rtol=1e-5, atol=1e-6)


def test_tensor_parallel_actually_shards_mlp():
    mesh = make_mesh("data:2,tensor:4")
    opts = {"all": optax.adam(1e-2)}
    state, _, _ = _setup(lambda: TinyMLP((4, 32, 32, 2), key=jax.random.key(2)), mesh,
                         lambda m: {"all": bcd.complete_filter(m)}, opts)
    specs = [layer.weight.sharding.spec for layer in state.model.layers]
    assert specs[0] == jax.sharding.PartitionSpec("tensor")  # column parallel
    assert specs[1] == jax.sharding.PartitionSpec(None, "tensor")  # row parallel


@pytest.mark.parametrize("mesh_spec", ["data:8", "data:4,fsdp:2", "data:2,tensor:4"])
@pytest.mark.parametrize("accum", [1, 2])
def test_shard_map_step_equals_jit_step(mesh_spec, accum):
    model_fn = lambda: SemiParam(key=jax.random.key(3))
    phases = [("param",), ("param", "nonparam")]
    a, la = _run(model_fn, mesh_spec, phases, options=StepOptions(grad_accum=accum))
    b, lb = _run(model_fn, mesh_spec, phases, options=StepOptions(impl="shard_map",
                                                                     grad_accum=accum))
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    assert_trees_allclose(a.model, b.model, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_equals_full_batch():
    model_fn = lambda: TinyMLP((4, 16, 2), key=jax.random.key(4))
    phases = [("all",)] * 2
    a, la = _run(model_fn, "data:8", phases, two_blocks=False)
    b, lb = _run(model_fn, "data:8", phases, options=StepOptions(grad_accum=4), two_blocks=False)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    assert_trees_allclose(a.model, b.model, rtol=1e-5, atol=1e-6)


def test_fsdp_holds_one_nth_of_params_and_optimizer_state():
    model_fn = lambda: TinyMLP((64, 256, 256, 64), key=jax.random.key(5))
    opts = {"all": optax.adam(1e-3)}
    blocks_fn = lambda m: {"all": bcd.complete_filter(m)}
    rep, _, _ = _setup(model_fn, make_mesh("data:8"), blocks_fn, opts)
    fs, _, _ = _setup(model_fn, make_mesh("fsdp:8"), blocks_fn, opts)
    for part in ("model", "opt_state"):
        full = sharding.addressable_bytes(getattr(rep, part))
        mine = sharding.addressable_bytes(getattr(fs, part))
        assert mine <= full / 8 * 1.05, (part, mine, full)


def test_bcd_phase_changes_only_its_block_bitwise():
    mesh = make_mesh("data:4,fsdp:2")
    opts = {"param": optax.adam(1e-2), "nonparam": optax.adam(1e-2)}
    state, step, batch = _setup(lambda: SemiParam(key=jax.random.key(6)), mesh,
                                bcd.model_blocks, opts)
    for active, moved, frozen in [(("param",), "coeff_mat", ("S_mat", "alpha_mat")),
                                  (("nonparam",), "S_mat", ("coeff_mat",))]:
        before_model = jax.tree.map(np.asarray, eqx.filter(state.model, eqx.is_array))
        other = "nonparam" if active == ("param",) else "param"
        before_other_opt = arrays(state.opt_state[other])
        before_opt = arrays(state.opt_state[active[0]])
        state, _ = step(state, batch, active)
        for f in frozen + ("basis_scale",):
            np.testing.assert_array_equal(getattr(state.model, f), getattr(before_model, f))
        assert not np.array_equal(getattr(state.model, moved), getattr(before_model, moved))
        for x, y in zip(arrays(state.opt_state[other]), before_other_opt, strict=False):
            np.testing.assert_array_equal(x, y)
        assert any(not np.array_equal(x, y)
                   for x, y in zip(arrays(state.opt_state[active[0]]), before_opt, strict=False))


def test_complete_bcd_equals_plain_optimizer():
    data = regression_data(64)
    model = SemiParam(key=jax.random.key(7))
    tx = optax.adam(1e-2)
    # plain optax on all trainable params, single device
    spec = bcd.complete_filter(model)
    ref, opt = model, tx.init(eqx.filter(model, spec))
    for _ in range(3):
        diff, static = eqx.partition(ref, spec)
        g = jax.grad(lambda d, static=static: mse(eqx.combine(d, static), data))(diff)
        u, opt = tx.update(g, opt, diff)
        ref = eqx.apply_updates(ref, u)
    # two per-block Adam optimizers, both blocks active, on 8 devices
    mesh = make_mesh("data:8")
    opts = {"param": optax.adam(1e-2), "nonparam": optax.adam(1e-2)}
    state, step, batch = _setup(lambda: SemiParam(key=jax.random.key(7)), mesh,
                                bcd.model_blocks, opts)
    for _ in range(3):
        state, _ = step(state, batch, ("param", "nonparam"))
    assert_trees_allclose(state.model, ref, rtol=1e-5, atol=1e-6)


def test_one_compilation_per_filter_spec():
    mesh = make_mesh("data:8")
    opts = {"param": optax.adam(1e-2), "nonparam": optax.adam(1e-2)}
    state, step, batch = _setup(lambda: SemiParam(key=jax.random.key(8)), mesh,
                                bcd.model_blocks, opts)
    for active in [("param",), ("nonparam",), ("param",), ("param", "nonparam"),
                   ("nonparam",), ("param", "nonparam"), ("param",)]:
        state, _ = step(state, batch, active)
    assert step.trace_counts == {("param",): 1, ("nonparam",): 1, ("param", "nonparam"): 1}


def test_nonfinite_update_is_skipped_and_counted():
    mesh = make_mesh("data:8")
    opts = {"all": optax.adam(1e-2)}
    state, step, batch = _setup(lambda: TinyMLP((4, 8, 2), key=jax.random.key(9)), mesh,
                                lambda m: {"all": bcd.complete_filter(m)}, opts)
    x = np.array(batch["x"])
    x[3, 1] = np.nan
    bad = dict(batch, x=jax.device_put(x, batch["x"].sharding))
    before = jax.tree.map(np.asarray, eqx.filter((state.model, state.opt_state), eqx.is_array))
    state, m = step(state, bad, ("all",))
    assert int(m["finite"]) == 0 and int(state.nonfinite_count) == 1
    assert_trees_equal(state.model, before[0])
    assert_trees_equal(state.opt_state, before[1])
    state, m = step(state, batch, ("all",))
    assert int(m["finite"]) == 1 and np.isfinite(float(m["loss"]))


def test_clip_norm_matches_optax_chain():
    data = regression_data(64)
    model = TinyMLP((4, 8, 2), key=jax.random.key(10))
    tx = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(0.1))
    ref, opt = model, tx.init(eqx.filter(model, eqx.is_array))
    g = jax.grad(lambda m: mse(m, data))(ref)
    u, _ = tx.update(g, opt, ref)
    ref = eqx.apply_updates(ref, u)
    mesh = make_mesh("data:8")
    state, step, batch = _setup(lambda: TinyMLP((4, 8, 2), key=jax.random.key(10)), mesh,
                                lambda m: {"all": bcd.complete_filter(m)},
                                {"all": optax.sgd(0.1)}, StepOptions(clip_norm=0.05))
    state, m = step(state, batch, ("all",))
    assert float(m["grad_norm"]) > 0.05  # the clip was active
    assert_trees_allclose(state.model, ref, rtol=1e-5, atol=1e-7)


def test_bf16_compute_keeps_fp32_params():
    model_fn = lambda: TinyMLP((4, 32, 2), key=jax.random.key(11))
    a, la = _run(model_fn, "data:8", [("all",)] * 2, two_blocks=False)
    b, lb = _run(model_fn, "data:8", [("all",)] * 2, options=StepOptions(compute_dtype="bfloat16"),
                 two_blocks=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(eqx.filter(b.model, eqx.is_array)))
    np.testing.assert_allclose(la, lb, rtol=3e-2)


def test_seed_make_step_updates_only_filtered_and_keeps_originals():
    data = regression_data(32)
    model = SemiParam(key=jax.random.key(12))
    optimizer = optax.adam(1e-3)
    spec = bcd.param_filter(model)
    opt_state = optimizer.init(eqx.filter(model, spec))
    before = jax.tree.map(np.asarray, eqx.filter(model, eqx.is_array))
    new, opt_state2, loss = make_step(model, opt_state, optimizer, data, mse, spec)
    assert np.isfinite(float(loss))
    assert_trees_equal(model, before)  # the original is unchanged
    np.testing.assert_array_equal(new.S_mat, model.S_mat)
    np.testing.assert_array_equal(new.alpha_mat, model.alpha_mat)
    assert not np.array_equal(new.coeff_mat, model.coeff_mat)
    # sharded inputs give the same result
    mesh = make_mesh("data:8")
    shm = sharding.shard(model, sharding.tree_shardings(model, mesh))
    shb = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in data.items()}
    new2, _, loss2 = make_step(shm, opt_state, optimizer, shb, mse, spec)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    assert_trees_allclose(new2, new, rtol=1e-6, atol=1e-7)


def test_unknown_block_is_a_clear_error():
    mesh = make_mesh("data:8")
    opts = {"all": optax.adam(1e-2)}
    state, step, batch = _setup(lambda: TinyMLP((4, 8, 2), key=jax.random.key(9)), mesh,
                                lambda m: {"all": bcd.complete_filter(m)}, opts)
    with pytest.raises(ValueError, match="unknown block"):
        step(state, batch, ("param",))


@pytest.mark.parametrize("mesh_spec", ["data:8", "fsdp:8"])
def test_minimal_metrics_step_gives_identical_parameters(mesh_spec):
    model_fn = lambda: SemiParam(n_feat=16, key=jax.random.key(1))
    phases = [("param",), ("param", "nonparam"), ("param", "nonparam")]
    full, full_losses = _run(model_fn, mesh_spec, phases)
    lean, lean_losses = _run(model_fn, mesh_spec, phases,
                             options=StepOptions(metrics="minimal"))
    assert lean_losses == full_losses
    assert_trees_equal((lean.model, lean.opt_state), (full.model, full.opt_state))
    state, step, batch = _setup(model_fn, make_mesh(mesh_spec), bcd.model_blocks,
                                {"param": optax.adam(1e-2), "nonparam": optax.adam(3e-3)},
                                StepOptions(metrics="minimal"))
    _, metrics = step(state, batch, ("param",))
    assert {"loss", "grad_norm", "finite", "nonfinite_count"} <= set(metrics)
    assert "update_norm" not in metrics
    with pytest.raises(ValueError, match="metrics='some'"):
        StepOptions(metrics="some")
