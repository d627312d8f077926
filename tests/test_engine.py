"""The one engine: generic BCD for any model that names its blocks, randomness for models that
take a key, and the evaluator that scores every row, through every entry point."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SemiParam, assert_trees_allclose, assert_trees_equal

from distributed import (
    Ratio,
    Trainer,
    TrainingConfig,
    general_train_cycle,
    make_mesh,
    weighted_masked_mse_loss,
)
from distributed.core import bcd
from distributed.core.state import init_state
from distributed.core.step import TrainStep
from distributed.engine import Evaluator


def xy(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.sin(x[:, :2]) + 0.3 * np.tanh(x[:, 2:] * 2) + 0.1 * x[:, :2] ** 2).astype(np.float32)
    return x, y


def user_loss(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def hparams(cycle, **kw):
    return dict(n_epochs_param=6, n_epochs_nonparam=6, n_epochs_complete=6, lr_param=2e-2,
                lr_nonparam=2e-2, batch_size=16, cycle_def=cycle, first_run=False) | kw


# ------------------------------------------------------------------------- generic BCD (10.1)


def test_generic_bcd_on_a_users_two_block_model():
    model = SemiParam(key=jax.random.key(1))
    train, val = xy(), xy(40, seed=1)
    only = general_train_cycle(model, train, val, hparams("only-parametric"), jax.random.key(0),
                               loss_fn=user_loss)
    # only the parametric block moved: the non-parametric one is untouched, bit for bit
    for name in ("S_mat", "alpha_mat", "basis_scale"):
        np.testing.assert_array_equal(np.asarray(getattr(only["model"], name)),
                                      np.asarray(getattr(model, name)))
    assert not np.array_equal(np.asarray(only["model"].coeff_mat), np.asarray(model.coeff_mat))
    complete = general_train_cycle(model, train, val, hparams("complete"), jax.random.key(0),
                                   loss_fn=user_loss)
    assert [p["name"] for p in complete["phases"]] == ["parametric", "non-parametric",
                                                       "complete"]
    assert set(complete["history"]) >= {"train_loss", "val_loss"}
    assert complete["val_losses"][-1] < 0.8 * only["val_losses"][-1]
    # the validation loss is the user's loss on every validation row
    x, y = val
    want = float(user_loss(eqx.nn.inference_mode(complete["model"]), (x, y)))
    assert complete["val_losses"][-1] == pytest.approx(want, rel=1e-5)


def test_generic_bcd_takes_dicts_and_explicit_filter_specs():
    model = SemiParam(key=jax.random.key(1))
    (x, y), (xv, yv) = xy(), xy(40, seed=1)
    specs = {"param": bcd.field_filter(model, ["coeff_mat", "alpha_mat"]),
             "nonparam": bcd.field_filter(model, ["S_mat"])}

    def loss(m, b):
        return jnp.mean((m(b["inputs"]) - b["targets"]) ** 2)

    out = general_train_cycle(model, {"inputs": x, "targets": y},
                              {"inputs": xv, "targets": yv}, hparams("only-non-parametric"),
                              jax.random.key(0), loss_fn=loss, filter_specs=specs)
    np.testing.assert_array_equal(np.asarray(out["model"].coeff_mat), np.asarray(model.coeff_mat))
    np.testing.assert_array_equal(np.asarray(out["model"].alpha_mat), np.asarray(model.alpha_mat))
    assert not np.array_equal(np.asarray(out["model"].S_mat), np.asarray(model.S_mat))
    assert len(out["val_losses"]) == 6


def test_unknown_cycle_lists_the_five():
    with pytest.raises(ValueError) as info:
        general_train_cycle(SemiParam(key=jax.random.key(1)), xy(), None,
                            hparams("sideways"), jax.random.key(0), loss_fn=user_loss)
    for name in bcd.CYCLES:
        assert f"'{name}'" in str(info.value)


def test_a_model_without_named_blocks_says_what_to_do():
    with pytest.raises(ValueError, match="param_fields.*filter specs"):
        general_train_cycle(eqx.nn.Linear(4, 2, key=jax.random.key(0)), xy(), None,
                            hparams("complete"), jax.random.key(0), loss_fn=user_loss)


# ------------------------------------------------------------------------- randomness (10.2)


class DropoutNet(eqx.Module):
    """A per-example regressor with dropout: ``__call__(x, *, key=None)``."""

    hidden: eqx.nn.Linear
    drop: eqx.nn.Dropout
    out: eqx.nn.Linear

    def __init__(self, key, p=0.3):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(4, 32, key=k1)
        self.drop = eqx.nn.Dropout(p)
        self.out = eqx.nn.Linear(32, 2, key=k2)

    def __call__(self, x, *, key=None):
        return self.out(self.drop(jax.nn.relu(self.hidden(x)), key=key))


def _dropout_trainer(mesh, seed=3):
    cfg = TrainingConfig(epochs=8, batch_size=16, learning_rate=1e-2, print_every=0, seed=seed,
                         early_stopping=False)
    return Trainer(DropoutNet(jax.random.key(0)), cfg, mesh=mesh)


def test_trainer_trains_a_dropout_model_and_predicts_in_inference_mode():
    trainer = _dropout_trainer(make_mesh("data:8"))
    model, history = trainer.train(xy(), xy(40, seed=1))
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    x = xy(8, seed=2)[0]
    a, b = trainer.predict(x), trainer.predict(x)
    np.testing.assert_array_equal(a, b)  # no dropout at prediction time
    want = jax.vmap(eqx.nn.inference_mode(model))(jnp.asarray(x))
    np.testing.assert_allclose(a, np.asarray(want), rtol=1e-6)
    # training mode draws masks: the same input gives different outputs under different keys
    k1, k2 = jax.random.split(jax.random.key(9))
    assert not np.allclose(model(x[0], key=k1), model(x[0], key=k2))


def test_dropout_training_is_deterministic_and_mesh_independent():
    a = _dropout_trainer(make_mesh("data:8")).train(xy(), None)[0]
    b = _dropout_trainer(make_mesh("data:8")).train(xy(), None)[0]
    assert_trees_equal(a, b)  # the same seed: the same parameters
    one = _dropout_trainer(make_mesh("data:1", jax.devices()[:1])).train(xy(), None)[0]
    assert_trees_allclose(a, one, rtol=1e-5, atol=1e-6)  # data:8 equals one device
    other = _dropout_trainer(make_mesh("data:8"), seed=4).train(xy(), None)[0]
    assert not np.allclose(np.asarray(other.hidden.weight), np.asarray(a.hidden.weight))


def test_train_step_hands_a_loss_taking_key_a_fresh_key_every_step():
    mesh = make_mesh("data:8")
    opts = {"all": optax.sgd(1e-3)}

    def loss(model, batch, *, key):
        noise = jax.random.uniform(key, ())
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {"noise": noise}

    state, sh = init_state(lambda: eqx.nn.Linear(4, 2, key=jax.random.key(0)), opts,
                           lambda m: {"all": bcd.complete_filter(m)}, key=jax.random.key(7),
                           mesh=mesh)
    step = TrainStep(lambda m, b, *, key: loss(jax.vmap(m), b, key=key), opts,
                     {"all": bcd.complete_filter(state.model)}, mesh=mesh, state_shardings=sh)
    x, y = xy(16)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    seen = []
    for _ in range(4):
        state, m = step(state, batch, ("all",))
        seen.append(float(m["noise"]))
    want = [float(jax.random.uniform(jax.random.fold_in(jax.random.key(7), s), ()))
            for s in range(4)]
    assert seen == pytest.approx(want, rel=1e-6)
    assert len(set(seen)) == 4


# ------------------------------------------------------------------ every row is scored (11.2)


def test_evaluator_scores_every_row_exactly():
    """37 rows on 8 devices in chunks of 16: the padded rows do not count, none is dropped."""
    rng = np.random.default_rng(0)
    rows = {"x": rng.normal(size=(37, 3, 3)).astype(np.float32),
            "y": rng.normal(size=(37, 3, 3)).astype(np.float32),
            "m": (rng.random((37, 3, 3)) < 0.3).astype(np.float32),
            "w": rng.uniform(0.1, 10, 37).astype(np.float32)}
    mesh = make_mesh("data:8")

    def metric(model, b):
        pred = b["x"] * model
        return {"wmse": weighted_masked_mse_loss(pred, b["y"], b["m"], b["w"], as_ratio=True),
                "mean_abs": jnp.mean(jnp.abs(pred - b["y"])), "pred": pred}

    scale = jnp.float32(1.5)
    ev = Evaluator(metric, rows, mesh=mesh, model_shardings=None, batch_size=16,
                   outputs=("pred",))
    scores, outs = ev.evaluate(scale)
    assert ev.num_chunks == 3
    pred = rows["x"] * 1.5
    keep = (1 - rows["m"]) * rows["w"][:, None, None]
    want = float(np.sum(keep * (pred - rows["y"]) ** 2) / np.sum(keep))
    assert scores["wmse"] == pytest.approx(want, rel=1e-5)
    assert scores["mean_abs"] == pytest.approx(float(np.mean(np.abs(pred - rows["y"]))),
                                               rel=1e-5)
    np.testing.assert_allclose(outs["pred"], pred, rtol=1e-6)


def test_trainer_validation_counts_every_row():
    (x, y), (xv, yv) = xy(64), xy(37, seed=5)
    cfg = TrainingConfig(epochs=1, batch_size=16, print_every=0, early_stopping=False)
    trainer = Trainer(eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0)), cfg)
    model, history = trainer.train((x, y), (xv, yv))
    pred = np.asarray(jax.vmap(model)(jnp.asarray(xv)))
    assert history["val_loss"][0] == pytest.approx(float(np.mean((pred - yv) ** 2)), rel=1e-5)
    assert history["val_rmse"][0] == pytest.approx(float(np.sqrt(np.mean((pred - yv) ** 2))),
                                                   rel=1e-5)


def test_a_ratio_loss_is_exact_on_uneven_masks():
    r = Ratio(jnp.float32(6.0), 3.0) + Ratio(jnp.float32(1.0), 4.0) + 2.0
    assert float(r.value()) == pytest.approx(2.0 + 0.25 + 2.0)
    parts = [Ratio(jnp.float32(1.0), 1.0), Ratio(jnp.float32(5.0), 3.0)]
    total = Ratio(sum(p.num for p in parts), sum(p.den for p in parts))
    assert float(total.value()) == pytest.approx(1.5)  # not the mean of 1 and 5/3
