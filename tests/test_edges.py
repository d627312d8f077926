"""Correct at the edges: gradient accumulation of normalised losses, aliased leaves, the CLI's
schedules, skipped updates, Python scalars in checkpoints (issue 11; the evaluator and the
desisky file format are in test_engine.py and test_model_file.py)."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli import metrics, run_cli, step_losses

import distributed as dx
from distributed.checkpoint import CheckpointManager
from distributed.core import bcd
from distributed.core.sharding import shard, tree_shardings
from distributed.core.state import create_state
from distributed.core.step import StepOptions, TrainStep
from distributed.loop import TrainingDiverged, run_loop

# ---------------------------------------------------------------- gradient accumulation (1)


class Optics(eqx.Module):
    """A stand-in for the PSF model: `model(positions, seds)`, `model.opd`, `alpha_mat`."""

    w: jax.Array
    alpha_mat: jax.Array

    def __init__(self, key):
        self.w = 0.3 * jax.random.normal(key, (6, 5))
        self.alpha_mat = jnp.linspace(-1.0, 1.0, 6)

    def __call__(self, x, seds):
        return (x @ self.w) * seds[:, :1]

    def opd(self, x):
        return jnp.tanh(x @ self.w)


def _batch(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32),
            "seds": rng.uniform(0.5, 1.5, size=(n, 3)).astype(np.float32),
            "y": rng.normal(size=(n, 5)).astype(np.float32),
            "m": (rng.random((n, 5)) < 0.3).astype(np.float32),
            "w": rng.uniform(0.1, 10.0, n).astype(np.float32)}


def _linear(m, b):
    return jax.vmap(m)(b["x"])


LOSSES = {
    "masked_mse": lambda m, b: dx.masked_mse_loss(_linear(m, b), b["y"], b["m"], as_ratio=True),
    "weighted_masked_mse": lambda m, b: dx.weighted_masked_mse_loss(
        _linear(m, b), b["y"], b["m"], b["w"], as_ratio=True),
    "total_loss": lambda m, b: dx.total_loss(m, b["x"], b["seds"], b["y"], b["m"],
                                             sample_weight=b["w"], l2_param=1e-2,
                                             l1_rate=1e-2, as_ratio=True),
    **{f"registry_{name}": (lambda fn: lambda m, b: fn(
        _linear(m, b), b["y"], b["w"], as_ratio=True))(dx.get_loss(name))
       for name in ("mse", "l2", "huber", "mae", "mape")},
    "registry_physics_informed": lambda m, b: dx.get_loss(
        "physics_informed", residual_fn=lambda p, x: p[:, :1] - x[:, :1])(
        _linear(m, b), b["y"], b["w"], inputs=b["x"], as_ratio=True),
    "user_ratio": lambda m, b: dx.Ratio(jnp.sum(b["w"][:, None] * (_linear(m, b) - b["y"]) ** 2),
                                        jnp.sum(b["w"]) * 5.0),
    "user_scalar_mean": lambda m, b: jnp.mean((_linear(m, b) - b["y"]) ** 2),
}


def _one_step(loss_name, options, mesh="data:8"):
    mesh = dx.make_mesh(mesh)
    uses_optics = loss_name == "total_loss"
    model = Optics(jax.random.key(0)) if uses_optics else eqx.nn.Linear(6, 5,
                                                                         key=jax.random.key(0))
    opts = {"all": optax.sgd(0.1)}
    blocks = {"all": bcd.complete_filter(model)}
    state, sh = dx.init_state(model, opts, blocks, key=jax.random.key(1), mesh=mesh)
    step = TrainStep(LOSSES[loss_name], opts, blocks, mesh=mesh, state_shardings=sh,
                     options=options)
    batch = dx.to_global(_batch(), mesh)
    losses = []
    for _ in range(2):
        state, m = step(state, batch, ("all",))
        losses.append(float(m["loss"]))
    return losses, state.model


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_gradient_accumulation_changes_memory_only(loss_name):
    """Same parameters, same global batch of 64 (weights in [0.1, 10], 30% masked): the loss
    and the update of grad_accum=4 (jit and shard_map) equal one full batch."""
    base, model = _one_step(loss_name, StepOptions())
    for options in (StepOptions(grad_accum=4), StepOptions(impl="shard_map"),
                    StepOptions(impl="shard_map", grad_accum=4)):
        losses, other = _one_step(loss_name, options)
        np.testing.assert_allclose(losses, base, rtol=2e-6, err_msg=str(options))
        for a, b in zip(jax.tree.leaves(eqx.filter(other, eqx.is_array)),
                        jax.tree.leaves(eqx.filter(model, eqx.is_array)), strict=True):
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                       atol=2e-6 * max(1.0, float(np.abs(b).max())))


def test_a_loss_that_cannot_be_split_is_computed_whole(caplog):
    phys = dx.get_loss("physics_informed", monotonicity_weight=0.1)
    assert phys.splittable is False
    LOSSES["monotone"] = lambda m, b: phys(_linear(m, b), b["y"])
    LOSSES["monotone"].splittable = False
    try:
        with caplog.at_level(logging.WARNING):
            accum, _ = _one_step("monotone", StepOptions(grad_accum=4))
        assert any("cannot be split into micro-batches" in r.message for r in caplog.records)
        whole, _ = _one_step("monotone", StepOptions())
        np.testing.assert_allclose(accum, whole, rtol=1e-6)
        with pytest.raises(ValueError, match="cannot be split over devices"):
            _one_step("monotone", StepOptions(impl="shard_map"))
    finally:
        del LOSSES["monotone"]


def test_cli_grad_accum_on_a_weighted_psf_file_gives_the_same_losses(tmp_path):
    from distributed.models import make_star_field

    field = make_star_field(n_train=64, n_val=16, n_test=8, seed=3)
    arrays = {k: np.concatenate([field["train"][k], field["val"][k]])
              for k in ("positions", "seds", "targets", "masks")}
    arrays["weights"] = np.random.default_rng(0).uniform(0.1, 10, 80).astype(np.float32)
    data = tmp_path / "weighted.npz"
    np.savez(data, **arrays)
    out = {}
    for accum in (1, 4):
        wd = tmp_path / f"a{accum}"
        p = run_cli(f"--workdir={wd}", f"--data={data}", "--batch_size=32", "--max_steps=3",
                    "--log_every=1", f"--grad_accum={accum}", "--host_devices=8",
                    "--progress=none", "--checkpoint_every=0")
        assert p.returncode == 0, p.stderr[-3000:]
        out[accum] = step_losses(wd)
    assert set(out[1]) == {1, 2, 3}
    for s in (1, 2, 3):
        assert out[4][s] == pytest.approx(out[1][s], rel=1e-5)


# ------------------------------------------------------------------------ aliased leaves (3)


class Tied(eqx.Module):
    enc: jax.Array
    dec: jax.Array

    def __call__(self, x):
        return (x @ self.enc) @ self.dec.T


def test_aliased_leaves_are_trained_without_crashing(caplog):
    w = lambda: 0.1 * jax.random.normal(jax.random.key(0), (6, 6))  # noqa: E731 (donated)
    mesh = dx.make_mesh("data:8")
    opts = {"all": optax.sgd(0.1)}

    def train(model):
        blocks = {"all": bcd.complete_filter(model)}
        state = create_state(model, opts, blocks, key=jax.random.key(1))
        state = shard(state, tree_shardings(state, mesh))
        step = TrainStep(lambda m, b: jnp.mean((m(b["x"]) - b["x"]) ** 2), opts, blocks,
                         mesh=mesh, state_shardings=tree_shardings(state, mesh))
        batch = dx.to_global({"x": np.eye(8, 6, dtype=np.float32)}, mesh)
        for _ in range(3):
            state, _ = step(state, batch, ("all",))
        return state.model

    with caplog.at_level(logging.WARNING):
        shared = w()
        tied = train(Tied(shared, shared))
    assert any(".enc" in r.message and ".dec" in r.message and "same array" in r.message
               for r in caplog.records)
    untied = train(Tied(w(), w()))
    np.testing.assert_allclose(np.asarray(tied.enc), np.asarray(untied.enc), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(tied.dec), np.asarray(untied.dec), rtol=1e-6)


# ------------------------------------------------------------------------- CLI schedules (4)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_cli_schedules_span_the_run(tmp_path, schedule):
    wd = tmp_path / schedule
    p = run_cli(f"--workdir={wd}", "--model=mlp", "--epochs=2", "--n_train=256",
                "--batch_size=64", "--log_every=1", f"--schedule={schedule}",
                "--learning_rate=0.01", "--host_devices=8", "--progress=none")
    assert p.returncode == 0, p.stderr[-3000:]
    lrs = {r["step"]: r["lr"] for r in metrics(wd) if "lr" in r and "loss" in r}
    assert sorted(lrs) == list(range(1, 9))
    cfg = dx.OptimizerConfig(learning_rate=0.01, schedule=schedule, total_steps=8)
    sched = dx.make_schedule(cfg)
    for s, lr in lrs.items():  # step s used the schedule's value at count s - 1
        assert lr == pytest.approx(float(sched(s - 1)), rel=1e-5, abs=1e-9)
    assert lrs[8] < 0.2 * lrs[1]


def test_bcd_block_schedules_count_each_blocks_updates():
    plan = bcd.make_phase_plan("complete", epochs_param=2, epochs_nonparam=1,
                               epochs_complete=1)
    clock = dx.EpochClock(100, 32)  # epochs end at steps 4, 7, 10, 13
    assert bcd.phase_boundaries(plan, clock) == [0, 7, 10, 13]
    assert bcd.block_updates(plan, clock) == {"param": 10, "nonparam": 6}


# ----------------------------------------------------------------- skipped updates (5)


def _nan_run(bad_steps, n=30):
    def step_fn(state, batch, key):
        finite = batch["i"] not in bad_steps
        count = state["skipped"] + (0 if finite else 1)
        loss = jnp.float32(1.0 / (1 + batch["i"])) if finite else jnp.float32(jnp.inf)
        return {"skipped": count}, {"loss": loss, "finite": jnp.int32(finite),
                                    "nonfinite_count": jnp.int32(count)}

    data = ({"i": i} for i in range(n))
    return run_loop({"skipped": 0}, step_fn, data_iterator=data, num_epochs=1, num_batches=n,
                    log_every=5, show_progress=False)


def test_skipped_updates_are_logged_and_left_out_of_the_epoch_loss(caplog):
    with caplog.at_level(logging.WARNING):
        state, result = _nan_run({3, 4, 17})
    warned = [r.message for r in caplog.records if "skipped" in r.message]
    assert warned and "non-finite" in warned[0]
    finite = [1.0 / (1 + i) for i in range(30) if i not in (3, 4, 17)]
    assert result.history["train_loss"] == [pytest.approx(np.mean(finite), rel=1e-6)]
    assert result.history["train_finite"] == [pytest.approx(27 / 30)]


def test_no_finite_update_in_a_window_fails_the_run():
    with pytest.raises(TrainingDiverged, match="no finite update in steps"):
        _nan_run(set(range(8, 30)))


# ----------------------------------------------------------- scalars in checkpoints (8)


def test_python_scalars_and_strings_are_saved_and_restored(tmp_path):
    state = {"w": jnp.arange(3.0), "epoch": 7, "temperature": 0.5, "tag": "phase-b",
             "done": True}
    with CheckpointManager(tmp_path / "ck") as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        template = {"w": jnp.zeros(3), "epoch": 0, "temperature": 1.0, "tag": "", "done": False}
        restored, _, _ = ckpt.restore(template)
    assert restored["epoch"] == 7 and restored["temperature"] == 0.5
    assert restored["tag"] == "phase-b" and restored["done"] is True
