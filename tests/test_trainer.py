"""Trainer, general_train_cycle, recovery and early stopping: the seeds' workflows, sharded."""

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli import ROOT, cli_env, run_cli
from helpers import TinyMLP, mse, regression_data

from distributed import (
    EarlyStopping,
    RecoveryPolicy,
    Trainer,
    TrainingConfig,
    general_train_cycle,
    load_model,
    make_mesh,
    register_loss,
)
from distributed.core import bcd, sharding
from distributed.core.state import init_state
from distributed.core.step import TrainStep
from distributed.loop import run_loop


def _xy(n=256, seed=0):
    d = regression_data(n, seed=seed)
    return d["x"], d["y"]


def _trainer_run(mesh, tmp_path):
    cfg = TrainingConfig(epochs=4, batch_size=32, learning_rate=3e-3, loss="huber",
                         huber_delta=0.5, save_best=True, save_dir=str(tmp_path),
                         run_name="m", print_every=0, seed=1)
    from distributed.models import MLP

    model = MLP(4, 2, 32, 1, key=jax.random.key(3))
    return Trainer(model, cfg, mesh=mesh).train(_xy(256), _xy(64, seed=1))


def test_trainer_same_history_on_8_devices_and_on_1(tmp_path):
    m8, h8 = _trainer_run(make_mesh("data:8"), tmp_path / "a")
    m1, h1 = _trainer_run(make_mesh("data:1", jax.devices()[:1]), tmp_path / "b")
    for key in ("train_loss", "val_loss", "val_rmse"):
        assert len(h8[key]) == 4
        np.testing.assert_allclose(h8[key], h1[key], rtol=1e-5)
    assert h8.best_val_loss == pytest.approx(h1.best_val_loss, rel=1e-5)
    assert h8.best_val_loss == min(h8["val_loss"])
    # the best model was saved with the seed-001 metadata and loads back
    model, meta = load_model(tmp_path / "a" / "m" / "best.eqx")
    assert meta["schema"] == 1 and "per_output_rmse" in meta["training"]
    assert meta["training"]["epoch"] == h8.best_epoch + 1  # "trained for N epochs" (seed 001)


def _mlp_system(sizes, tx):
    """An MLP TrainState on a data:8 mesh and its one-block TrainStep."""
    mesh = make_mesh("data:8")
    opts = {"all": tx}
    blocks_fn = lambda m: {"all": bcd.complete_filter(m)}  # noqa: E731
    state, sh = init_state(lambda: TinyMLP(sizes, key=jax.random.key(0)), opts, blocks_fn,
                           key=jax.random.key(0), mesh=mesh)
    return mesh, state, TrainStep(mse, opts, blocks_fn(state.model), mesh=mesh,
                                  state_shardings=sh)


def test_early_stopping_stops_at_the_right_epoch_and_restores_best():
    mesh, state, step = _mlp_system((4, 8, 2), optax.sgd(1e-2))
    data = regression_data(64)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in data.items()}
    curve = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 2.0, 1.0])  # best at epoch 2, patience 3


    stopper = EarlyStopping("val_loss", patience=3)
    state, result = run_loop(state, lambda s, b, k: step(s, b, ("all",)),
                             data_iterator_fn=lambda: [batch] * 2, num_epochs=8, num_batches=2,
                             evaluate=lambda s: {"loss": next(curve)},
                             callbacks=[stopper], show_progress=False)
    assert stopper.best_epoch == 2 and stopper.stopped_epoch == 5
    assert result.history["val_loss"] == [5.0, 4.0, 3.0, 3.5, 3.2, 3.1]
    assert int(state.step) == 6  # the state at the end of epoch 2 (2 steps per epoch)


def _guarded_run(batches, policy):
    mesh, state, step = _mlp_system((4, 16, 2), optax.adam(1e-2))
    put = lambda d: {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in d.items()}
    seen = []

    def step_fn(s, b, k):
        before = jax.tree.map(np.asarray, eqx.filter(s.model, eqx.is_array))
        s, m = step(s, put(b), ("all",))
        seen.append((before, m))
        return s, m

    return run_loop(state, step_fn, data_iterator_fn=lambda: iter(batches), num_epochs=1,
                    num_batches=len(batches), recovery=policy, log_every=1,
                    show_progress=False), seen


def test_nan_batch_is_skipped_without_corrupting_the_model():
    good = [regression_data(64, seed=i) for i in range(8)]
    bad = dict(good[3], x=good[3]["x"].copy())
    bad["x"][5, 0] = np.nan
    batches = good[:3] + [bad] + good[4:]
    (state, result), seen = _guarded_run(batches, None)
    assert int(state.nonfinite_count) == 1
    assert int(seen[3][1]["finite"]) == 0
    # the model after the NaN step equals the model before it
    after_nan = jax.tree.map(np.asarray, eqx.filter(seen[4][0], eqx.is_array))
    for x, y in zip(jax.tree.leaves(after_nan), jax.tree.leaves(seen[3][0]), strict=False):
        np.testing.assert_array_equal(x, y)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(
        eqx.filter(state.model, eqx.is_array)))
    assert np.isfinite(float(seen[-1][1]["loss"]))


def test_loss_explosion_rolls_back_lowers_lr_and_finishes(caplog):
    good = [regression_data(64, seed=i) for i in range(16)]
    boom = dict(good[8], y=good[8]["y"] * 1e4)  # an exploding batch
    batches = good[:8] + [boom] + good[9:]
    policy = RecoveryPolicy(explosion_factor=10.0, window=4, snapshot_every=2, lr_reduction=0.5)
    with caplog.at_level("WARNING", logger="distributed"):
        (state, result), seen = _guarded_run(batches, policy)
    assert float(state.lr_scale) == pytest.approx(0.5)
    assert any("rolling back" in r.message for r in caplog.records)
    assert int(state.step) == len(batches)  # the step counter kept counting batches
    assert np.isfinite(float(seen[-1][1]["loss"])) and float(seen[-1][1]["loss"]) < 10


def test_general_train_cycle_complete_beats_only_parametric():
    from distributed.models import PSFFieldModel, evaluate_psf, make_star_field, psf_batch_tuple

    field = make_star_field(n_train=256, n_val=32, n_test=64)
    train, val = psf_batch_tuple(field["train"]), psf_batch_tuple(field["val"])
    model = PSFFieldModel(key=jax.random.key(0))
    base = dict(n_epochs_param=6, n_epochs_nonparam=6, n_epochs_complete=3, lr_param=1e-2,
                lr_nonparam=3e-3, batch_size=32, l2_param=1e-9, l1_rate=0.0, first_run=True)
    res = general_train_cycle(model, train, val, dict(base, cycle_def="complete"),
                              jax.random.key(1))
    only = general_train_cycle(model, train, val, dict(base, cycle_def="only-parametric",
                                                        n_epochs_param=15), jax.random.key(1))
    full, par = evaluate_psf(res["model"], field["test"]), evaluate_psf(only["model"],
                                                                        field["test"])
    assert full["psf_rmse"] < par["psf_rmse"] and full["opd_rmse"] < par["opd_rmse"]
    assert [p["name"] for p in res["phases"]] == ["parametric", "non-parametric", "complete"]
    assert len(res["train_losses"]) == 15 and len(res["val_losses"]) == 15
    assert len(res["phases"][0]["train_losses"]) == 6
    # only-parametric never moved the non-parametric block; first_run zeroed alpha in it
    np.testing.assert_array_equal(only["model"].S_mat, model.S_mat)
    np.testing.assert_array_equal(only["model"].alpha_mat, 0 * model.alpha_mat)
    # the complete cycle restored identity mixing after its parametric phase, then trained it
    assert not np.array_equal(res["model"].alpha_mat, 0 * model.alpha_mat)


def test_mlp_on_sklearn_digits_reaches_95_percent():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from distributed.models import MLP

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    onehot = np.eye(10, dtype=np.float32)[y]
    xtr, xte, ytr, yte = train_test_split(x, onehot, test_size=0.25, random_state=0)
    n = (len(xtr) // 32) * 32

    @register_loss("softmax_xent_test", overwrite=True)
    def _xent(**_):
        return lambda pred, target, weights=None: jnp.mean(
            optax.softmax_cross_entropy(pred, target))

    cfg = TrainingConfig(epochs=30, batch_size=32, learning_rate=3e-3, loss="softmax_xent_test",
                         print_every=0, early_stopping=False, seed=0)
    model = MLP(64, 10, 64, 2, key=jax.random.key(0))
    trainer = Trainer(model, cfg, mesh=make_mesh("data:8"))
    trained, history = trainer.train((xtr[:n], ytr[:n]), (xte, yte))
    acc = float(np.mean(np.argmax(trainer.predict(xte, trained), -1) == np.argmax(yte, -1)))
    assert acc >= 0.95, acc


def test_report_writes_pngs_for_a_finished_run(tmp_path):
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", "--host_devices=8", "--model=mlp", "--epochs=2",
                "--n_train=256", "--batch_size=32", "--progress=none", "--log_every=2")
    assert p.returncode == 0, p.stderr[-2000:]
    q = subprocess.run([sys.executable, "-m", "distributed.report", str(wd)], env=cli_env(),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert q.returncode == 0, q.stderr[-2000:]
    pngs = sorted((wd / "report").glob("*.png"))
    assert len(pngs) >= 2 and all(png.stat().st_size > 1000 for png in pngs)
    assert (wd / "report" / "report.txt").read_text().strip()
    missing = subprocess.run([sys.executable, "-m", "distributed.report", str(tmp_path / "no")],
                             env=cli_env(), cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_load_model_rebuilds_an_eqx_nn_mlp(tmp_path):
    """Seed 001 trains an `eqx.nn.MLP`; `load_model` must give it back from the metadata."""
    from distributed import save_checkpoint

    m = eqx.nn.MLP(6, 4, 16, 2, activation=jax.nn.tanh, key=jax.random.key(1))
    save_checkpoint(m, tmp_path / "m.eqx")
    m2, meta = load_model(tmp_path / "m.eqx")
    assert meta["activation"] == "tanh" and m2.activation is jax.nn.tanh
    x = jnp.ones((6,))
    np.testing.assert_array_equal(m(x), m2(x))


@pytest.mark.parametrize("kwargs, field", [
    ({"epochs": 0}, "epochs"), ({"batch_size": -1}, "batch_size"),
    ({"optimizer": "adagrad"}, "optimizer"), ({"scheduler": "step"}, "scheduler"),
    ({"learning_rate": 0.0}, "learning_rate"), ({"lr_reduction": 2.0}, "lr_reduction"),
    ({"explosion_factor": 1.0}, "explosion_factor"), ({"loss": "nope"}, "loss"),
    ({"huber_delta": 0.5}, "huber_delta"), ({"scheduler": "cosine_warm_restarts"}, "T0"),
    ({"run_name": "../escape"}, "run_name"), ({"run_name": "/abs/path"}, "run_name"),
    ({"run_name": "a/../../b"}, "run_name"), ({"run_name": "~/x"}, "run_name"),
    ({"run_name": ""}, "run_name"),
])
def test_training_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**kwargs)


def test_training_config_aliases_and_nested_run_name():
    cfg = TrainingConfig(num_epochs=7, patience=3, validation_frequency=2, run_name="a/b")
    assert (cfg.epochs, cfg.early_stopping_patience, cfg.validate_every) == (7, 3, 2)
    assert TrainingConfig(scheduler_T0=5).scheduler == "cosine_warm_restarts"
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg


def test_every_data_form_gives_the_same_arrays():
    from types import SimpleNamespace

    from distributed.seeds.trainer import as_arrays

    x, y = _xy(32)
    ref = as_arrays((x, y), "d")
    forms = [{"x": x, "y": y}, [(x[:16], y[:16]), (x[16:], y[16:])],
             [{"x": x[:16], "y": y[:16]}, {"x": x[16:], "y": y[16:]}],
             [SimpleNamespace(x=a, y=b) for a, b in zip(x, y, strict=True)],
             lambda: iter([(x[:16], y[:16]), (x[16:], y[16:])])]
    for form in forms:
        got = as_arrays(form, "d")
        assert set(got) == {"x", "y"}
        np.testing.assert_array_equal(got["x"], ref["x"])
        np.testing.assert_array_equal(got["y"], ref["y"])
    w = np.linspace(0, 1, 32, dtype=np.float32)
    np.testing.assert_array_equal(as_arrays((x, y, w), "d")["weights"], w)
    with pytest.raises(ValueError, match="same number"):
        as_arrays((x, y, w[:3]), "train_data")
    with pytest.raises(ValueError, match="'x' and 'y'"):
        as_arrays({"inputs": x}, "train_data")


def test_streamed_epochs_with_an_exploding_batch_roll_back_through_the_config():
    from distributed.models import MLP

    x, y = _xy(96)  # 64 to train on, 32 to validate
    calls = []

    def epoch_batches():  # called once to count the batches, then once per epoch
        calls.append(1)
        for i in range(0, 64, 16):
            scale = 1e6 if (len(calls) == 3 and i == 32) else 1.0  # epoch 1, third batch
            yield x[i:i + 16], y[i:i + 16] * scale

    cfg = TrainingConfig(epochs=4, batch_size=16, learning_rate=1e-2, explosion_factor=10.0,
                         lr_reduction=0.5, print_every=0)
    model, history = Trainer(MLP(4, 2, 16, 1, key=jax.random.key(0)), cfg).train(
        epoch_batches, (x[64:], y[64:]))
    assert len(calls) == 5 and history.epochs_run == 4
    assert history.lr_scale == pytest.approx(0.5)  # one rollback, learning rate halved
    assert history.train_loss[1] > 1e6  # the exploded step is in that epoch's mean
    assert np.isfinite(history.train_loss[-1]) and history.train_loss[-1] < history.train_loss[0]
    assert history.val_loss[-1] < history.val_loss[0]
