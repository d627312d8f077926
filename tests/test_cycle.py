"""Seed 000's `train_epoch` and `general_train_cycle`: BCD phases over the one loop."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SemiParam, assert_trees_allclose, assert_trees_equal

from distributed.core import bcd
from distributed.core.clock import EpochClock
from distributed.core.mesh import make_mesh
from distributed.core.state import create_state
from distributed.data import epoch_batches
from distributed.engine import PhaseStep
from distributed.loop.callbacks import Hook
from distributed.models import PSFFieldModel, evaluate_psf, make_star_field, psf_batch_tuple
from distributed.seeds import general_train_cycle, make_step, train_epoch
from distributed.seeds.cycle import psf_arrays

OPTICS = dict(n_pupil=16, n_pix=16, lambdas=(0.6, 0.8))  # a small, fast PSF field


def semiparam_data(n=64, seed=0):
    """SemiParam data dressed as the seed tuple: positions=x, seds/masks unused, targets=y."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.sin(x[:, :2]) + 0.3 * np.tanh(x[:, 2:] * 2)).astype(np.float32)
    return x, np.ones((n, 1), np.float32), y, np.zeros_like(y)


def semi_loss(model, batch):
    return jnp.mean((model(batch[0]) - batch[2]) ** 2)


def hparams(**kw):
    return dict(n_epochs_param=2, n_epochs_nonparam=2, n_epochs_complete=2, lr_param=1e-2,
                lr_nonparam=1e-2, batch_size=16, l2_param=0.0, l1_rate=0.0,
                cycle_def="complete", first_run=False) | kw


def test_train_epoch_is_make_step_over_grain_batches():
    model = SemiParam(key=jax.random.key(0))
    data = (semiparam_data()[0], semiparam_data()[2])
    spec = bcd.param_filter(model)
    opt = optax.adam(1e-2)
    state0 = opt.init(eqx.filter(model, spec))
    loss = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)
    key = jax.random.key(3)
    new, state, epoch_loss = train_epoch(model, state0, opt, data, 16, loss, spec, key)
    # the same batches by hand
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    ref, ref_state, losses = model, state0, []
    for b in epoch_batches({"0": data[0], "1": data[1]}, global_batch_size=16, seed=seed,
                           epoch=0):
        ref, ref_state, lo = make_step(ref, ref_state, opt, (b["0"], b["1"]), loss, spec)
        losses.append(float(lo))
    assert len(losses) == 4
    assert_trees_equal(new, ref)
    assert epoch_loss == pytest.approx(np.mean(losses), rel=1e-6)
    assert_trees_equal(eqx.filter(new, bcd.nonparam_filter(new)),
                       eqx.filter(model, bcd.nonparam_filter(model)))  # only its block moved
    other, _, _ = train_epoch(model, state0, opt, data, 16, loss, spec, jax.random.key(4))
    assert not np.array_equal(np.asarray(other.coeff_mat), np.asarray(new.coeff_mat))


def test_psf_cycle_moves_one_block_per_phase_with_first_run():
    """(That "complete" beats "only-parametric" is in test_trainer.py.)"""
    field = make_star_field(n_train=64, n_val=32, n_test=32, seed=0, **OPTICS)
    e, spe = 2, 2
    snaps = []

    def snap(info):
        if info.final:
            return
        m = info.state.model
        snaps.append({k: np.asarray(getattr(m, k)) for k in ("coeff_mat", "S_mat", "alpha_mat")})

    h = dict(n_epochs_param=e, n_epochs_nonparam=e, n_epochs_complete=e, lr_param=1e-2,
             lr_nonparam=1e-2, batch_size=32, l2_param=1e-9, l1_rate=1e-6, first_run=True,
             cycle_def="complete")
    init = PSFFieldModel(key=jax.random.key(0), **OPTICS)
    res = general_train_cycle(init, psf_batch_tuple(field["train"]),
                              psf_batch_tuple(field["val"]), h, jax.random.key(0),
                              hooks=[Hook(snap, every=1)])
    assert [p["name"] for p in res["phases"]] == ["parametric", "non-parametric", "complete"]
    assert [p["first_epoch"] for p in res["phases"]] == [0, e, 2 * e]
    assert len(res["train_losses"]) == len(res["val_losses"]) == 3 * e
    assert all(len(p["train_losses"]) == len(p["val_losses"]) == e for p in res["phases"])
    assert np.all(np.isfinite(res["train_losses"] + res["val_losses"]))
    assert evaluate_psf(res["model"], field["test"])["psf_rmse"] < \
        evaluate_psf(init, field["test"])["psf_rmse"]
    # each phase moves only its block; first_run zeroes alpha, then restores the identity
    p1, p2, p3 = snaps[:e * spe], snaps[e * spe:2 * e * spe], snaps[2 * e * spe:]
    assert len(p3) == e * spe
    assert all(np.all(s["alpha_mat"] == 0) for s in p1)
    assert all(np.array_equal(s["S_mat"], np.asarray(init.S_mat)) for s in p1)
    assert not np.array_equal(p1[-1]["coeff_mat"], np.asarray(init.coeff_mat))
    assert all(np.array_equal(s["coeff_mat"], p1[-1]["coeff_mat"]) for s in p2)
    eye = np.asarray(init.set_alpha_identity().alpha_mat)
    assert np.max(np.abs(p2[0]["alpha_mat"] - eye)) <= 1.01e-2  # identity + one Adam step
    assert not np.array_equal(p2[-1]["S_mat"], p2[0]["S_mat"])
    for k in ("coeff_mat", "S_mat", "alpha_mat"):
        assert not np.array_equal(p3[-1][k], p2[-1][k])
    # per-block Adam states survived across phases: each block took 2 * e * spe steps
    for block in ("param", "nonparam"):
        counts = [int(v) for p, v in jax.tree_util.tree_leaves_with_path(
            res["state"].opt_state[block]) if "count" in jax.tree_util.keystr(p)]
        assert counts and set(counts) == {2 * e * spe}
    np.testing.assert_array_equal(np.asarray(init.alpha_mat), eye)  # the input is untouched


def test_cycle_on_8_devices_equals_1_device():
    out = []
    for mesh in (make_mesh("data:8"), make_mesh("data:1", jax.devices()[:1])):
        out.append(general_train_cycle(SemiParam(key=jax.random.key(1)), semiparam_data(),
                                       semiparam_data(32, seed=1), hparams(), jax.random.key(0),
                                       mesh=mesh, loss_fn=semi_loss))
    np.testing.assert_allclose(out[0]["train_losses"], out[1]["train_losses"], rtol=1e-5)
    np.testing.assert_allclose(out[0]["val_losses"], out[1]["val_losses"], rtol=1e-5)
    assert_trees_allclose(out[0]["model"], out[1]["model"], rtol=1e-5, atol=1e-6)


def test_sample_weights_are_the_fifth_element():
    seen = []

    def loss(model, batch):
        seen.append(len(batch))
        w = batch[4][:, None]
        return jnp.sum(w * (model(batch[0]) - batch[2]) ** 2) / jnp.sum(w)

    data = semiparam_data()
    weights = np.r_[np.ones(32), np.zeros(32)].astype(np.float32)
    garbage = data[2].copy()
    garbage[32:] = 1e3  # zero-weight stars: their targets must not matter
    a = general_train_cycle(SemiParam(key=jax.random.key(1)), (*data, weights), None,
                            hparams(cycle_def="only-parametric"), jax.random.key(0),
                            loss_fn=loss)
    b = general_train_cycle(SemiParam(key=jax.random.key(1)),
                            (data[0], data[1], garbage, data[3], weights), None,
                            hparams(cycle_def="only-parametric"), jax.random.key(0),
                            loss_fn=loss)
    assert set(seen) == {5}
    assert a["val_losses"] == []
    assert_trees_allclose(a["model"], b["model"], rtol=1e-6, atol=1e-7)


def test_l1_rate_schedule_is_applied_per_phase_epoch():
    model = SemiParam(key=jax.random.key(0))
    blocks = bcd.model_blocks(model)
    state = create_state(model, {b: optax.sgd(0.1) for b in blocks}, blocks, key=jax.random.key(0))
    calls = []

    def fake_step(state, batch, active):
        calls.append((active, float(batch["l1_rate"][0])))
        return state, {}

    plan = bcd.make_phase_plan("parametric", epochs_param=11, epochs_nonparam=1)
    mesh = make_mesh("data:8")
    fn = PhaseStep(fake_step, plan, EpochClock(2, 1), None, mesh,
                   extras=lambda p, e: {"l1_rate": 1e-3 * 0.5 ** (e // 10)})
    batch = {"x": jnp.zeros((8, 4))}
    for _ in range(24):
        state, _ = fn(state, batch, None)
    assert [c[0] for c in calls] == [("param",)] * 22 + [("nonparam",)] * 2
    assert [c[1] for c in calls[18:]] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize("change, match", [
    ({"n_epochs_param": None}, "missing \\['n_epochs_param'\\]"),
    ({"cycle_def": "both"}, "unknown BCD cycle 'both'"),
    ({"lr_param": -1.0}, "lr_param"),
    ({"batch_size": 12}, "batch_size"),
    ({"n_epoch_param": 3}, "unknown key"),
])
def test_hparams_are_validated(change, match):
    h = hparams(**{k: v for k, v in change.items() if v is not None})
    h = {k: v for k, v in h.items() if change.get(k, 0) is not None}
    with pytest.raises(ValueError, match=match):
        general_train_cycle(SemiParam(key=jax.random.key(0)), semiparam_data(), None, h,
                            jax.random.key(0), loss_fn=semi_loss)


def test_psf_arrays_checks_the_tuple():
    x, s, y, m = semiparam_data()
    assert set(psf_arrays((x, s, y, m), "d")) == {"positions", "seds", "targets", "masks",
                                                  "weights"}
    with pytest.raises(ValueError, match="tuple"):
        psf_arrays((x, y), "train_data")
    with pytest.raises(ValueError, match="same number"):
        psf_arrays((x, s, y[:3], m), "train_data")
