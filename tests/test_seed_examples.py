"""The code examples of the five seed documents, translated to this package's names, run and
checked against what each document says.

Seeds: 000 WaveDiff-JAX training, 001 desisky training module, 002 beagle `train_loop`,
003 BatteryML training guide, 004 opifex training API. Left out (no counterpart here):
LightGBM, PyTorch-only pieces (torch.load, DualTracker/MLflow, YAML/Hydra), quantum/DFT/
physics-config/MultiScale/ModularTrainer components, multilevel training, adaptive sampling.
Flax ``TrainState.create`` / ``apply_fn`` become an Equinox model in a `distributed.TrainState`
(or a plain pytree state) driven by `train_loop`.
"""

import dataclasses
import math
import types
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distributed import (
    Callback,
    Metrics,
    OptimizerConfig,
    RecoveryPolicy,
    Trainer,
    TrainingConfig,
    TrainState,
    average_metrics,
    calculate_sample_weights,
    complete_filter,
    compute_metrics,
    configure_optimizer,
    create_state,
    current_learning_rate,
    format_metrics,
    general_train_cycle,
    get_loss,
    l1_schedule_rule,
    l2_opd_regularization,
    list_losses,
    load_checkpoint,
    load_model,
    lp_regularization,
    make_optimizer,
    make_schedule,
    make_step,
    masked_mse_loss,
    mse_loss,
    nonparam_filter,
    param_filter,
    print_metrics,
    read_metadata,
    register_loss,
    save_checkpoint,
    total_loss,
    train_epoch,
    train_loop,
    weighted_masked_mse_loss,
)
from distributed.checkpoint import CheckpointManager
from distributed.core import registry as losses_module
from distributed.core.clock import EpochClock
from distributed.models import MLP, PSFFieldModel, make_star_field, psf_batch_tuple
from distributed.seeds.trainer import _optimizer as trainer_optimizer
from distributed.seeds.trainer import _recovery as trainer_recovery

SMALL_OPTICS = dict(n_pupil=16, n_pix=16, n_zernikes=10)


def _leaves(tree):
    def host(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [host(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _assert_equal_trees(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


# ============================================================== seed 000: WaveDiff-JAX training
@pytest.fixture(scope="module")
def psf():
    """A small star field and PSF model, plus the seed's optimizer / loss objects (shared so the
    jitted step compiles once for the whole module)."""
    data = make_star_field(n_train=64, n_val=32, n_test=32, seed=0, **SMALL_OPTICS)
    model = PSFFieldModel(key=jax.random.key(0), n_features=4, **SMALL_OPTICS)
    optimizer = optax.adam(1e-3)

    def loss_fn(model, batch):
        positions, packed_seds, targets, masks = batch
        return total_loss(model, positions, packed_seds, targets, masks,
                          sample_weight=None, l2_param=1e-4, l1_rate=0.0)

    train = tuple(np.array(a) for a in psf_batch_tuple(data["train"]))
    val = tuple(np.array(a) for a in psf_batch_tuple(data["val"]))
    return types.SimpleNamespace(data=data, model=model, optimizer=optimizer, loss_fn=loss_fn,
                                 train=train, val=val)


def test_000_single_training_step_returns_new_model_originals_unchanged(psf):
    model, optimizer = psf.model, psf.optimizer
    filter_spec = param_filter(model)
    opt_state = optimizer.init(eqx.filter(model, filter_spec))
    before, opt_before = _leaves(model), _leaves(opt_state)
    batch = tuple(jnp.asarray(a[:32]) for a in psf.train)

    new_model, new_opt_state, loss = make_step(model, opt_state, optimizer, batch, psf.loss_fn,
                                               filter_spec)

    assert np.isfinite(float(loss)) and float(loss) > 0
    assert float(loss) == pytest.approx(float(psf.loss_fn(model, batch)), rel=1e-5)
    # "returns a new model and optimizer state - the originals are unchanged"
    for x, y in zip(before, _leaves(model), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(opt_before, _leaves(opt_state), strict=True):
        np.testing.assert_array_equal(x, y)
    assert new_model is not model
    # only the parametric block (coeff_mat) moved
    assert not np.array_equal(np.asarray(new_model.coeff_mat), np.asarray(model.coeff_mat))
    for name in ("S_mat", "alpha_mat", "zernike_basis", "pupil"):
        np.testing.assert_array_equal(np.asarray(getattr(new_model, name)),
                                      np.asarray(getattr(model, name)))
    assert int(new_opt_state[0].count) == 1 and int(opt_state[0].count) == 0


def test_000_trainability_filters(psf):
    model = psf.model

    def selected(spec):
        return {name for name in ("coeff_mat", "S_mat", "alpha_mat", "zernike_basis", "pupil")
                if getattr(spec, name) is True}

    assert selected(param_filter(model)) == {"coeff_mat"}  # "only parametric (coeff_mat)"
    assert selected(nonparam_filter(model)) == {"S_mat", "alpha_mat"}
    assert selected(complete_filter(model)) == {"coeff_mat", "S_mat", "alpha_mat"}
    # the specs mirror the model structure
    assert jax.tree.structure(param_filter(model)) == jax.tree.structure(model)


def test_000_train_epoch(psf):
    model, optimizer = psf.model, psf.optimizer
    filter_spec = param_filter(model)
    opt_state = optimizer.init(eqx.filter(model, filter_spec))
    start = float(psf.loss_fn(model, tuple(jnp.asarray(a) for a in psf.train)))
    out = [train_epoch(model, opt_state, optimizer, data=psf.train, batch_size=32,
                       loss_fn=psf.loss_fn, filter_spec=filter_spec,
                       key=jax.random.PRNGKey(epoch)) for epoch in (0, 0)]
    (m1, s1, l1), (m2, _, l2) = out
    assert isinstance(l1, float) and np.isfinite(l1)
    assert l1 == l2  # the shuffle is a deterministic function of the key
    _assert_equal_trees(m1, m2)
    assert int(s1[0].count) == 2  # 64 stars / batch 32 = 2 make_step calls
    end = float(psf.loss_fn(m1, tuple(jnp.asarray(a) for a in psf.train)))
    assert end < start
    np.testing.assert_array_equal(np.asarray(m1.S_mat), np.asarray(model.S_mat))


def test_000_general_train_cycle_bcd(psf):
    hparams = dict(n_epochs_param=1, n_epochs_nonparam=1, n_epochs_complete=0,
                   lr_param=1e-2, lr_nonparam=1e-2, batch_size=32, l2_param=1e-4,
                   l1_rate=1e-6, cycle_def="parametric", first_run=True)
    results = general_train_cycle(model=psf.model, train_data=psf.train, val_data=psf.val,
                                  training_hparams=hparams, key=jax.random.PRNGKey(0))
    trained_model = results["model"]
    train_losses, val_losses = results["train_losses"], results["val_losses"]
    assert len(train_losses) == 2 and len(val_losses) == 2  # 1 + 1 epochs
    assert all(np.isfinite(train_losses)) and all(np.isfinite(val_losses))
    # "parametric": 1. train parametric -> 2. train non-parametric
    assert [(p["name"], tuple(p["blocks"])) for p in results["phases"]] == [
        ("parametric", ("param",)), ("non-parametric", ("nonparam",))]
    for name in ("coeff_mat", "S_mat"):
        assert not np.array_equal(np.asarray(getattr(trained_model, name)),
                                  np.asarray(getattr(psf.model, name)))
    # fixed arrays are in neither block
    np.testing.assert_array_equal(np.asarray(trained_model.pupil), np.asarray(psf.model.pupil))
    # first_run: alpha was zeroed for the parametric phase, restored to identity before the
    # non-parametric one; the caller's model is untouched
    np.testing.assert_array_equal(np.asarray(psf.model.alpha_mat),
                                  np.asarray(psf.model.set_alpha_identity().alpha_mat))
    assert np.abs(np.asarray(trained_model.alpha_mat)).sum() > 0


def test_000_available_losses():
    rng = np.random.default_rng(0)
    pred = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
    mask = np.zeros((3, 4, 4), np.float32)
    mask[0, 0, 0] = 1.0  # 1 = exclude
    d2 = np.square(np.asarray(pred) - np.asarray(target))
    assert float(mse_loss(pred, target)) == pytest.approx(d2.mean(), rel=1e-6)
    assert float(masked_mse_loss(pred, target, mask)) == pytest.approx(
        d2[mask == 0].mean(), rel=1e-6)
    np.testing.assert_allclose(float(weighted_masked_mse_loss(pred, target, mask, jnp.ones(3))),
                               float(masked_mse_loss(pred, target, mask)), rtol=1e-6)
    w = jnp.asarray([1.0, 0.0, 0.0])  # only star 0 counts
    assert float(weighted_masked_mse_loss(pred, target, mask, w)) == pytest.approx(
        d2[0][mask[0] == 0].mean(), rel=1e-6)
    opd = jnp.ones((2, 3, 3))
    assert float(l2_opd_regularization(opd, 0.5)) == pytest.approx(0.5 * 18 / 2)
    alpha = jnp.asarray([[2.0, -1.0], [0.0, 0.5]])
    assert float(lp_regularization(alpha, 1e-2)) == pytest.approx(
        1e-2 * (2**1.1 + 1 + 0.5**1.1), rel=1e-6)  # p = 1.1


def test_000_total_loss_composition(psf):
    model = psf.model
    positions, seds, targets, masks = (jnp.asarray(a[:8]) for a in psf.train)
    weights = jnp.linspace(0.5, 1.5, 8)
    data = weighted_masked_mse_loss(model(positions, seds), targets, masks, weights)
    l2 = l2_opd_regularization(model.opd(positions), 1e-3)
    lp = lp_regularization(model.alpha_mat, 1e-2)
    got = total_loss(model, positions, seds, targets, masks, sample_weight=weights,
                     l2_param=1e-3, l1_rate=1e-2)
    assert float(got) == pytest.approx(float(data + l2 + lp), rel=1e-5)
    assert float(lp) > 0 and float(l2) > 0


def test_000_l1_schedule_rule():
    l1 = l1_schedule_rule(epoch=20, l1_rate=1e-3)
    assert l1 == pytest.approx(2.5e-4)  # halved twice: at epoch 10 and 20
    assert l1_schedule_rule(epoch=9, l1_rate=1e-3) == pytest.approx(1e-3)
    assert l1_schedule_rule(epoch=10, l1_rate=1e-3) == pytest.approx(5e-4)


def test_000_checkpointing_exact_round_trip(psf, tmp_path):
    model = eqx.tree_at(lambda m: m.coeff_mat, psf.model, psf.model.coeff_mat + 0.123)
    path = tmp_path / "checkpoints" / "epoch_100.eqx"
    save_checkpoint(model, path)
    template = PSFFieldModel(key=jax.random.key(7), n_features=4, **SMALL_OPTICS)
    loaded = load_checkpoint(template, path)
    _assert_equal_trees(loaded, model)
    assert not np.array_equal(np.asarray(template.coeff_mat), np.asarray(loaded.coeff_mat))


def test_000_sample_weights():
    rng = np.random.default_rng(0)
    stars = np.zeros((5, 16, 16), np.float32)
    stars[:, 6:10, 6:10] = 1.0
    sigmas = np.array([0.01, 0.02, 0.01, 0.04, 0.01])
    stars = stars + sigmas[:, None, None] * rng.normal(size=stars.shape).astype(np.float32)
    weights = calculate_sample_weights(stars, use_sample_weights=True, masked=False)
    assert weights.shape == (5,)
    assert np.median(weights) == pytest.approx(1.0)  # normalised by the median
    assert weights[3] < weights[1] < weights[0]  # inverse variance: noisier -> lighter
    assert weights[0] / weights[3] == pytest.approx(16, rel=0.5)
    assert calculate_sample_weights(stars, use_sample_weights=False) is None


def test_000_configure_optimizer_tf_defaults():
    optimizer = configure_optimizer(lr=1e-3, b1=0.9, b2=0.999, eps=1e-7)
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.asarray([1e-7, -1e-7, 1.0])}  # eps matters for tiny gradients
    upd, _ = optimizer.update(grads, optimizer.init(params), params)
    ref, _ = optax.adam(1e-3, 0.9, 0.999, 1e-7).update(grads, optax.adam(1e-3).init(params),
                                                      params)
    np.testing.assert_allclose(np.asarray(upd["w"]), np.asarray(ref["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["w"]), [-5e-4, 5e-4, -1e-3], rtol=1e-4)
    default_upd = configure_optimizer(lr=1e-3).update(grads, optimizer.init(params), params)[0]
    np.testing.assert_allclose(np.asarray(default_upd["w"]), np.asarray(upd["w"]), rtol=1e-6)


# ============================================================== seed 001: desisky training
BANDS = ("V", "g", "r", "z")


def _sky_data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    w = rng.normal(size=(6, 4)).astype(np.float32) / 3
    y = (np.tanh(x) @ w + 20.0).astype(np.float32)  # sky magnitudes around 20
    cut = int(0.7 * n)  # the 70 / 30 split
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def test_001_quick_start_broadband_trainer_and_checkpoint_header(tmp_path, capsys):
    (train_set, test_set) = _sky_data(n=160)
    model = eqx.nn.MLP(in_size=6, out_size=4, width_size=16, depth=2,
                       key=jax.random.PRNGKey(42))
    config = TrainingConfig(epochs=3, batch_size=16, learning_rate=1e-3, loss="huber",
                            huber_delta=0.25, save_best=True, save_dir=str(tmp_path),
                            run_name="my_broadband_model", print_every=50,
                            validate_every=1, output_names=BANDS)
    trainer = Trainer(model, config)
    model, history = trainer.train(train_set, test_set)
    print(f"Best test loss: {history.best_test_loss:.4f}")
    assert "Best test loss: " in capsys.readouterr().out
    assert isinstance(model, eqx.nn.MLP)
    assert len(history["train_loss"]) == 3 and len(history["val_loss"]) == 3
    assert history.best_test_loss == pytest.approx(min(history["val_loss"]))
    assert history.best_test_loss == history.best_val_loss

    path = tmp_path / "my_broadband_model" / "best.eqx"
    meta = read_metadata(path)  # "JSON header + Equinox binary"
    assert meta["schema"] == 1
    assert {k: meta["arch"][k] for k in ("in_size", "out_size", "width_size", "depth")} == {
        "in_size": 6, "out_size": 4, "width_size": 16, "depth": 2}
    tr = meta["training"]
    assert tr["epoch"] == history.best_epoch + 1
    assert tr["test_loss"] == pytest.approx(history.best_test_loss, rel=1e-6)
    assert isinstance(tr["train_loss"], float) and isinstance(tr["date"], str)
    assert sorted(tr["per_output_rmse"]) == sorted(BANDS)  # seed: per_band_rmse
    assert all(v > 0 for v in tr["per_output_rmse"].values())
    assert {k: tr["config"][k] for k in ("epochs", "learning_rate", "loss", "huber_delta")} == {
        "epochs": 3, "learning_rate": 1e-3, "loss": "huber", "huber_delta": 0.25}
    # the binary part is the best model
    best = load_checkpoint(model, path)
    assert len(_leaves(best)) == len(_leaves(model))


def test_001_training_config_fields():
    config = TrainingConfig(epochs=500, learning_rate=1e-4, loss="huber", huber_delta=0.25,
                            save_best=True, save_dir=None, run_name="my_model",
                            print_every=50, validate_every=1)
    assert (config.epochs, config.learning_rate, config.loss, config.huber_delta) == (
        500, 1e-4, "huber", 0.25)
    assert config.save_best and config.print_every == 50 and config.validate_every == 1
    trainer = Trainer(MLP(6, 4, 8, 1, key=jax.random.key(0)), config)
    assert str(trainer.best_path).endswith("my_model/best.eqx")
    # the config's Huber delta reaches the loss: |d| = 1 > 0.25 -> 0.25 * (1 - 0.125)
    assert float(trainer.loss_fn(jnp.ones(4), jnp.zeros(4))) == pytest.approx(0.25 * 0.875)
    with pytest.raises(ValueError, match="loss"):
        TrainingConfig(loss="not-a-loss")


def test_001_load_saved_model_returns_model_and_meta(tmp_path):
    (train_set, test_set) = _sky_data(n=96, seed=1)
    config = TrainingConfig(epochs=2, batch_size=16, learning_rate=1e-3, loss="huber",
                            huber_delta=0.25, save_best=True, save_dir=str(tmp_path),
                            run_name="broadband", print_every=0, output_names=BANDS)
    trained, history = Trainer(MLP(6, 4, 16, 2, key=jax.random.key(1)), config).train(
        train_set, test_set)
    model, meta = load_model(tmp_path / "broadband" / "best.eqx")
    assert isinstance(model, MLP)
    assert meta["training"]["epoch"] == history.best_epoch + 1
    assert meta["training"]["test_loss"] == pytest.approx(history.best_test_loss, rel=1e-6)
    text = (f"Trained for {meta['training']['epoch']} epochs; "
            f"Test loss: {meta['training']['test_loss']:.4f}; "
            f"V-band RMSE: {meta['training']['per_output_rmse']['V']:.4f}")
    assert "V-band RMSE" in text
    if history.best_epoch == len(history["train_loss"]) - 1:  # best = last: same weights
        _assert_equal_trees(model, trained)
    x = jnp.asarray(test_set[0])
    np.testing.assert_allclose(np.asarray(model(x)), Trainer(model, config).predict(x),
                               rtol=1e-5)


def test_001_custom_optimizer_is_used_as_given():
    (train_set, _) = _sky_data(n=64, seed=2)
    calls = []

    def counting():  # an optax transformation that records its use, then passes updates on
        def update(updates, state, params=None):
            calls.append(1)
            return updates, state
        return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), counting(), optax.adam(1e-4))
    config = TrainingConfig(epochs=1, batch_size=16, learning_rate=1.0, loss="huber",
                            huber_delta=0.25, print_every=0, early_stopping=False)
    model = MLP(6, 4, 8, 1, key=jax.random.key(2))
    trainer = Trainer(model, config, optimizer=optimizer)
    trained, history = trainer.train(train_set)
    assert trainer.optimizer is optimizer
    assert calls  # traced inside the compiled step
    # 44 rows, batch 16: 3 steps. Adam at 1e-4 moves each weight by at most ~3e-4 (the
    # config's lr=1.0 would move it by ~3)
    assert int(trainer.state.step) == 3
    for a, b in zip(_leaves(trained), _leaves(model), strict=True):
        assert np.max(np.abs(a - b)) <= 3.5e-4
    assert len(history["train_loss"]) == 1


def test_001_custom_loss_function():
    def custom_loss(pred, targets):
        return jnp.mean((pred - targets) ** 2)

    (train_set, val_set) = _sky_data(n=64, seed=3)
    config = TrainingConfig(epochs=2, batch_size=16, learning_rate=1e-2, print_every=0)
    trainer = Trainer(MLP(6, 4, 8, 1, key=jax.random.key(3)), config, loss_fn=custom_loss)
    assert trainer.loss_fn is custom_loss
    model, history = trainer.train(train_set, val_set)
    pred = trainer.predict(val_set[0])
    assert history["val_loss"][-1] == pytest.approx(
        float(custom_loss(jnp.asarray(pred), jnp.asarray(val_set[1]))), rel=1e-4)


# ============================================================== seed 002: beagle train_loop
def _classification(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int32)
    return x, y


def _state(model, lr=0.05):
    spec = complete_filter(model)
    return create_state(model, {"all": optax.adam(lr)}, {"all": spec}, key=jax.random.key(0))


TX = optax.adam(0.05)


@eqx.filter_jit
def _train_step(state, batch, rng_key):
    def loss_fn(model):
        logits = jax.vmap(model)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    diff, static = eqx.partition(state.model, eqx.is_inexact_array)
    loss, grads = jax.value_and_grad(lambda d: loss_fn(eqx.combine(d, static)))(diff)
    updates, opt = TX.update(grads, state.opt_state["all"], diff)
    new_state = dataclasses.replace(state, step=state.step + 1,
                                    model=eqx.apply_updates(state.model, updates),
                                    opt_state={"all": opt})
    return new_state, {"loss": loss}


@eqx.filter_jit
def _val_step(state, batch, rng_key):
    preds = jax.vmap(state.model)(batch["x"])
    accuracy = jnp.mean(preds.argmax(-1) == batch["y"])
    return state, {"accuracy": accuracy}


def _batches(x, y, size):
    return [{"x": x[i:i + size], "y": y[i:i + size]} for i in range(0, len(x), size)]


def test_002_quick_start_train_loop_with_checkpoints(tmp_path):
    x, y = _classification(64)
    model = eqx.nn.MLP(4, 2, 16, 1, key=jax.random.key(0))
    initial_state = _state(model)
    assert isinstance(initial_state, TrainState)

    def data_iterator_fn():
        yield from _batches(x, y, 16)

    final_state, history = train_loop(
        state=initial_state, train_step_fn=_train_step, data_iterator_fn=data_iterator_fn,
        num_epochs=3, num_batches=4, rng_key=jax.random.PRNGKey(0),
        checkpoint_dir=str(tmp_path / "my_model"), checkpoint_every=1, show_progress=False)
    print(f"Final loss: {history['train_loss'][-1]}")
    assert len(history["train_loss"]) == 3
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert int(final_state.step) == 12
    with CheckpointManager(tmp_path / "my_model") as mngr:
        assert mngr.all_steps() == [4, 8, 12]  # every epoch of 4 batches
        restored, _, step = mngr.restore(initial_state)
    assert step == 12
    _assert_equal_trees(restored.model, final_state.model)


def _run_with_validation(rng_key):
    x, y = _classification(64)
    xv, yv = _classification(32, seed=1)

    def val_data_iterator():
        yield from _batches(xv, yv, 16)

    return train_loop(
        _state(eqx.nn.MLP(4, 2, 16, 1, key=jax.random.key(0))), _train_step,
        lambda: iter(_batches(x, y, 16)), num_epochs=3, num_batches=4, rng_key=rng_key,
        val_step_fn=_val_step, val_data_iterator=val_data_iterator(), val_num_batches=2,
        show_progress=False)


def test_002_validation_history_keys():
    _, history = _run_with_validation(rng_key=None)
    assert "train_loss" in history and "val_accuracy" in history
    assert len(history["train_loss"]) == 3 and len(history["val_accuracy"]) == 3
    assert history["val_accuracy"][-1] >= 0.75


def test_002_validation_with_rng_key():
    _, history = _run_with_validation(rng_key=jax.random.PRNGKey(0))
    assert len(history["val_accuracy"]) == 3


def test_002_manual_save_and_load_checkpoint(tmp_path):
    state = _state(eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(1)))
    x, y = _classification(16)
    state, _ = _train_step(state, {"x": x, "y": y}, None)  # a non-trivial optimizer state
    path = tmp_path / "model" / "checkpoint_100.eqx"
    save_checkpoint(state, path, {"step": 100})
    template = _state(eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(2)))
    restored_state = load_checkpoint(template, path)
    _assert_equal_trees(restored_state, state)
    assert read_metadata(path)["step"] == 100


def test_002_metrics_average_and_format():
    batch_metrics = [Metrics(values={"loss": 1.0}), Metrics(values={"loss": 2.0})]
    avg = average_metrics(batch_metrics)
    assert isinstance(avg, Metrics) and avg.values == {"loss": 1.5}
    assert format_metrics(avg) == "loss: 1.5000"


class _LinState(eqx.Module):
    w: jax.Array
    opt_state: Any
    batch_stats: dict


_SGD = optax.sgd(0.1)


@jax.jit
def _multi_step(state, batch, rng_key):
    def loss_fn(w):
        pred = batch["x"] @ w
        recon = jnp.mean((pred - batch["y"]) ** 2)
        kl = 1e-3 * jnp.sum(w**2)
        return recon + kl, (recon, kl, jnp.mean(jnp.sign(pred) == jnp.sign(batch["y"])))

    (total, (recon, kl, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(state.w)
    upd, opt = _SGD.update(g, state.opt_state, state.w)
    # the batch-norm pattern: non-gradient statistics carried in the state
    mean = 0.9 * state.batch_stats["mean"] + 0.1 * batch["x"].mean(0)
    new_state = _LinState(optax.apply_updates(state.w, upd), opt, {"mean": mean})
    return new_state, {"total_loss": total, "recon_loss": recon, "kl_loss": kl,
                       "accuracy": acc}


def test_002_multiple_metrics_and_batch_stats():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(64, 3)) + 2.0).astype(np.float32)
    y = x @ np.array([1.0, -1.0, 0.5], np.float32)
    w = jnp.zeros(3)
    state = _LinState(w, _SGD.init(w), {"mean": jnp.zeros(3)})
    final_state, history = train_loop(state, _multi_step, lambda: iter(_batches(x, y, 16)),
                                      num_epochs=2, num_batches=4, rng_key=None,
                                      show_progress=False)
    assert {"train_total_loss", "train_recon_loss", "train_kl_loss",
            "train_accuracy"} <= set(history)
    assert all(len(v) == 2 for v in history.values())
    np.testing.assert_allclose(np.add(history["train_recon_loss"], history["train_kl_loss"]),
                               history["train_total_loss"], rtol=1e-5)
    # 8 updates of the running mean towards the data mean (~2)
    expected = 1 - 0.9**8
    np.testing.assert_allclose(np.asarray(final_state.batch_stats["mean"]),
                               expected * x.mean(0), rtol=0.1)


# ============================================================== seed 003: BatteryML training
@dataclasses.dataclass
class _Sample:
    x: np.ndarray
    y: np.ndarray


def _samples(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.normal(size=5).astype(np.float32)
        out.append(_Sample(x, np.asarray([0.9 + 0.05 * np.tanh(x[0] - x[1])], np.float32)))
    return out


class _Tracker:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


BATTERY_CONFIG = {"epochs": 3, "batch_size": 32, "learning_rate": 1e-3, "weight_decay": 0.01,
                  "early_stopping_patience": 20, "gradient_clip": 1.0, "use_amp": True}


def test_003_trainer_fit_with_dict_config_and_tracker():
    train_samples, val_samples = _samples(128, 0), _samples(32, 1)
    tracker = _Tracker()
    model = MLP(5, 1, 16, 2, key=jax.random.key(0))
    trainer = Trainer(model=model, config=dict(BATTERY_CONFIG, print_every=0), tracker=tracker)
    history = trainer.fit(train_samples, val_samples)
    assert len(history["train_loss"]) == 3
    for key in ("val_loss", "val_rmse", "val_mae", "val_mape", "val_r2"):
        assert len(history[key]) == 3
    assert [step for step, _ in tracker.logged] == [0, 1, 2]  # logged automatically
    assert all("train_loss" in m and "val_rmse" in m for _, m in tracker.logged)
    assert trainer.config.gradient_clip == 1.0 and trainer.config.weight_decay == 0.01
    assert trainer._compute_dtype() is None  # AMP is off without a GPU
    # positional tracker (seed: Trainer(model, config, tracker))
    assert Trainer(model, dict(BATTERY_CONFIG), tracker).tracker is tracker
    with pytest.raises(ValueError, match="unknown key"):
        Trainer(model, {"epochs": 1, "no_such_option": 1})


def test_003_loss_via_trainer_configuration():
    model = MLP(5, 1, 8, 1, key=jax.random.key(0))
    config = {"epochs": 1, "batch_size": 8}
    pred, target = jnp.asarray([0.0, 2.0, 0.9]), jnp.asarray([0.0, 0.0, 1.0])
    assert float(Trainer(model, config).loss_fn(pred, target)) == pytest.approx(
        float(jnp.mean((pred - target) ** 2)))  # default MSE
    huber = Trainer(model, config, loss_config={"name": "huber", "delta": 0.5}).loss_fn
    assert float(huber(pred, target)) == pytest.approx(
        (0 + 0.5 * (2.0 - 0.25) + 0.5 * 0.1**2) / 3, rel=1e-5)
    phys = Trainer(model, config, loss_config={"name": "physics_informed",
                                               "monotonicity_weight": 0.1,
                                               "smoothness_weight": 0.05}).loss_fn
    soh = jnp.asarray([1.0, 0.9, 1.0])  # an SOH increase: penalised
    target = jnp.asarray([1.0, 0.9, 0.8])
    mse_part = 0.04 / 3
    mono = 0.1 * (0.0 + 0.1) / 2
    smooth = 0.05 * 0.2**2
    assert float(phys(soh, target)) == pytest.approx(mse_part + mono + smooth, rel=1e-5)


def test_003_loss_registry_programmatic_usage():
    assert {"mse", "physics_informed", "huber", "mape", "mae"} <= set(list_losses())
    loss_fn = get_loss("huber", delta=0.5)
    predictions, targets = jnp.asarray([0.0, 1.0, 3.0]), jnp.asarray([0.2, 1.0, 1.0])
    loss = loss_fn(predictions, targets)
    assert float(loss) == pytest.approx((0.5 * 0.04 + 0 + 0.5 * (2.0 - 0.25)) / 3, rel=1e-5)
    assert float(get_loss("mae")(predictions, targets)) == pytest.approx(2.2 / 3, rel=1e-6)
    assert float(get_loss("mse", reduction="sum")(predictions, targets)) == pytest.approx(4.04)
    assert get_loss("mse", reduction="none")(predictions, targets).shape == (3,)
    mape = get_loss("mape")(jnp.asarray([1.1, 0.0]), jnp.asarray([1.0, 0.0]))
    assert float(mape) == pytest.approx(5.0, rel=1e-5)  # percent; epsilon guards 0 / 0
    with pytest.raises(ValueError, match="valid names"):
        get_loss("nope")


def test_003_custom_loss_registration():
    name = "my_custom_loss_seed003"

    @register_loss(name)
    class MyCustomLoss:
        def __init__(self, alpha: float = 1.0, reduction: str = "mean"):
            self.alpha, self.reduction = alpha, reduction

        def __call__(self, pred, target, t=None):
            return jnp.mean((pred - target) ** 2) * self.alpha

    try:
        assert name in list_losses()
        loss = get_loss(name, alpha=2.0)
        assert float(loss(jnp.ones(3), jnp.zeros(3))) == pytest.approx(2.0)
        trainer = Trainer(MLP(5, 1, 8, 1, key=jax.random.key(0)),
                          TrainingConfig(epochs=1, loss=name, loss_params={"alpha": 3.0}))
        assert isinstance(trainer.loss_fn, MyCustomLoss) and trainer.loss_fn.alpha == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_loss(name)(MyCustomLoss)
    finally:
        losses_module._REGISTRY.pop(name, None)


def test_003_compute_and_print_metrics(capsys):
    y_true = np.array([0.95, 0.90, 0.85])
    y_pred = np.array([0.94, 0.91, 0.86])
    metrics = compute_metrics(y_true, y_pred)
    assert metrics["rmse"] == pytest.approx(0.01, rel=1e-6)
    assert metrics["mae"] == pytest.approx(0.01, rel=1e-6)
    assert metrics["mape"] == pytest.approx(100 * np.mean(0.01 / y_true), rel=1e-6)  # 1.11 %
    assert metrics["r2"] == pytest.approx(1 - 3e-4 / 5e-3, rel=1e-6)  # 0.94
    print_metrics(metrics)
    assert capsys.readouterr().out.splitlines() == [
        "RMSE: 0.0100", "MAE:  0.0100", "MAPE: 1.11%", "R²:   0.9400"]


def test_003_early_stopping_patience_restores_best():
    # validation targets are the negated training targets: fitting the training data makes
    # the validation loss worse every epoch, so the best is epoch 0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (np.sin(x[:, :1]) + 1.0).astype(np.float32)
    config = {"epochs": 10, "batch_size": 16, "learning_rate": 3e-2,
              "early_stopping_patience": 2, "print_every": 0}
    trainer = Trainer(MLP(5, 1, 16, 1, key=jax.random.key(0)), config)
    model, history = trainer.train((x, y), (x, -y))
    assert history.best_epoch == 0
    assert history.stopped_epoch == 2 and history.epochs_run == 3  # 2 epochs w/o improvement
    assert min(history["val_loss"][1:]) > history["val_loss"][0]
    # the best model is restored after training
    val_loss = float(jnp.mean((jnp.asarray(trainer.predict(x, model)) - (-y)) ** 2))
    assert val_loss == pytest.approx(history.best_val_loss, rel=1e-4)


def test_003_cosine_warm_restarts_scheduler_T0():
    config = TrainingConfig.from_dict({"scheduler_T0": 50})
    assert config.scheduler == "cosine_warm_restarts"
    sched = make_schedule(OptimizerConfig(learning_rate=1e-3, schedule="cosine_warm_restarts",
                                          T0=50))
    lr = lambda t: float(sched(t))  # noqa: E731
    assert lr(0) == pytest.approx(1e-3)  # starts at learning_rate
    assert lr(25) == pytest.approx(5e-4, rel=1e-5)
    assert lr(49) < 1e-5  # decreases to 0 over T0
    assert lr(50) == pytest.approx(1e-3)  # restart, period T0 * 2
    assert lr(100) == pytest.approx(5e-4, rel=1e-5)
    assert lr(150) == pytest.approx(1e-3)  # restart, period T0 * 4
    assert lr(250) == pytest.approx(5e-4, rel=1e-5)
    # in the Trainer T0 counts epochs: T0 = 1 epoch of 4 steps -> restarts at steps 4 and 12
    trainer = Trainer(MLP(6, 4, 8, 1, key=jax.random.key(0)),
                      {"epochs": 3, "learning_rate": 1e-3, "scheduler_T0": 1})
    tx = trainer_optimizer(trainer.config, None, 12, EpochClock(4, 1))
    params = {"w": jnp.zeros(2)}
    opt_state, used = tx.init(params), []
    for _ in range(13):
        _, opt_state = tx.update({"w": jnp.ones(2)}, opt_state, params)
        used.append(float(current_learning_rate(opt_state)))  # lr of the latest update
    assert used[0] == pytest.approx(1e-3) and used[2] == pytest.approx(5e-4, rel=1e-5)
    assert used[4] == pytest.approx(1e-3) and used[8] == pytest.approx(5e-4, rel=1e-5)
    assert used[12] == pytest.approx(1e-3)


def _lr_history():
    x, y = (a[:32] for a in _sky_data(n=64, seed=4)[0])  # 32 examples / batch 16: 2 steps
    _, history = Trainer(MLP(6, 4, 8, 1, key=jax.random.key(0)),
                         {"epochs": 3, "batch_size": 16, "learning_rate": 1e-3,
                          "scheduler_T0": 1, "print_every": 0}).train((x, y))
    return history["lr"]


def test_003_lr_history_shows_warm_restart():
    lrs = _lr_history()
    # per-epoch means of the applied lr: [0.75, 0.93, 0.32] x 1e-3 (restart at epoch 1)
    np.testing.assert_allclose(lrs, [7.5e-4, 0.5 * (1 + 0.5 * (1 + 2**-0.5)) * 1e-3,
                                     0.5 * (0.5 + 0.5 * (1 - 2**-0.5)) * 1e-3], rtol=1e-4)


def test_003_gradient_clip_elementwise():
    trainer = Trainer(MLP(5, 1, 8, 1, key=jax.random.key(0)),
                      {"epochs": 1, "optimizer": "sgd", "learning_rate": 1.0,
                       "gradient_clip": 1.0})
    tx = trainer_optimizer(trainer.config, None, 1, EpochClock(1, 1))
    params = {"w": jnp.zeros(3)}
    upd, _ = tx.update({"w": jnp.asarray([5.0, -0.5, -7.0])}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["w"]), [-1.0, 0.5, 1.0])  # clipped to [-1, 1]
    plain = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0))
    upd, _ = plain.update({"w": jnp.asarray([5.0])}, plain.init({"w": jnp.zeros(1)}))
    np.testing.assert_allclose(np.asarray(upd["w"]), [-5.0])


def test_003_custom_callback_on_epoch_end():
    seen = []

    class MyCallback(Callback):
        def on_epoch_end(self, epoch, metrics):
            seen.append((epoch, dict(metrics)))

    train_samples, val_samples = _samples(64, 2), _samples(32, 3)
    config = dict(BATTERY_CONFIG, epochs=3, batch_size=16, print_every=0)
    Trainer(MLP(5, 1, 8, 1, key=jax.random.key(0)), config,
            callbacks=[MyCallback()]).fit(train_samples, val_samples)
    assert [e for e, _ in seen] == [0, 1, 2]
    assert all("train_loss" in m and "val_loss" in m for _, m in seen)


# ============================================================== seed 004: opifex training API
def test_004_basic_training_workflow_with_seed_004_names():
    x = np.linspace(-1, 1, 128, dtype=np.float32)[:, None]
    y = np.sin(3 * x).astype(np.float32)
    model = MLP(1, 1, 32, 2, activation="tanh", key=jax.random.key(42))  # StandardMLP([1,32,32,1])
    config = TrainingConfig(num_epochs=4, batch_size=64, learning_rate=1e-2, print_every=0)
    assert config.epochs == 4 and config.num_epochs == 4
    trainer = Trainer(model, config)
    trained_model, history = trainer.train((x, y), (x[::4], y[::4]))
    assert len(history["train_loss"]) == 4
    assert history["train_loss"][-1] < history["train_loss"][0]
    state = trainer.training_state
    assert state.epoch == 4 and state.step == 8  # 128 / 64 = 2 steps per epoch
    print(f"Current epoch: {state.epoch}")
    print(f"Best validation loss: {state.best_val_loss}")
    assert state.best_val_loss == pytest.approx(min(history["val_loss"]))


def test_004_training_config_parameters():
    config = TrainingConfig(num_epochs=1000, batch_size=64, learning_rate=1e-3,
                            validation_frequency=100, checkpoint_frequency=500,
                            early_stopping=True, patience=50)
    assert (config.epochs, config.batch_size, config.learning_rate) == (1000, 64, 1e-3)
    assert config.validate_every == config.validation_frequency == 100
    assert config.checkpoint_every == config.checkpoint_frequency == 500
    assert config.early_stopping is True
    assert config.early_stopping_patience == config.patience == 50
    with pytest.raises(ValueError, match="disagree"):
        TrainingConfig(num_epochs=10, epochs=20)


def test_004_validation_frequency_and_patience_in_validations():
    x, y = _sky_data(n=64, seed=5)[0]
    _, history = Trainer(MLP(6, 4, 8, 1, key=jax.random.key(0)),
                         TrainingConfig(num_epochs=4, batch_size=32, learning_rate=1e-3,
                                        validation_frequency=2, print_every=0)).train(
        (x, y), (x[:16], y[:16]))
    assert history["val_epoch"] == [1, 3]  # validated every 2 epochs
    assert len(history["val_loss"]) == 2 and len(history["train_loss"]) == 4


def test_004_error_recovery_config():
    cfg = {"max_retries": 5, "gradient_clip_threshold": 1.0, "loss_explosion_threshold": 100.0,
           "checkpoint_on_error": True}
    policy = RecoveryPolicy(threshold=cfg["loss_explosion_threshold"],
                            max_retries=cfg["max_retries"])
    assert policy.max_retries == 5 and policy.threshold == 100.0
    config = TrainingConfig(max_retries=5, grad_clip_norm=cfg["gradient_clip_threshold"],
                            loss_explosion_threshold=100.0)
    trainer = Trainer(MLP(6, 4, 8, 1, key=jax.random.key(0)), config)
    built = trainer_recovery(trainer.config)
    assert isinstance(built, RecoveryPolicy)
    assert (built.max_retries, built.threshold, built.lr_reduction) == (5, 100.0, 0.5)
    assert trainer_recovery(TrainingConfig()) is None
    with pytest.raises(ValueError):
        RecoveryPolicy(explosion_factor=1.0)


def test_004_nan_detection_skips_nonfinite_updates():
    x, y = _sky_data(n=64, seed=6)[0]
    y = y.copy()
    y[16:32] = 1e6  # marks the second batch of an unshuffled epoch

    def loss_fn(pred, target):  # NaN on the marked batch
        bad = jnp.any(target > 1e5)
        return jnp.where(bad, jnp.nan, jnp.mean((pred - target) ** 2))

    config = TrainingConfig(num_epochs=1, batch_size=16, learning_rate=1e-3, shuffle=False,
                            print_every=0)
    model = MLP(6, 4, 8, 1, key=jax.random.key(0))
    trained, history = Trainer(model, config, loss_fn=loss_fn).train((x, y))
    assert history.nonfinite_skipped == 1
    assert all(np.all(np.isfinite(a)) for a in _leaves(trained))


def test_004_optimizer_factory_adamw_cosine():
    opt_cfg = OptimizerConfig(name="adamw", learning_rate=1e-3, schedule="cosine",
                              total_steps=1000, alpha=0.0)
    sched = make_schedule(opt_cfg)
    assert float(sched(0)) == pytest.approx(1e-3)
    assert float(sched(500)) == pytest.approx(5e-4, rel=1e-5)
    assert float(sched(1000)) == pytest.approx(0.0, abs=1e-9)
    tx = make_optimizer(opt_cfg)
    params = {"w": jnp.ones(2)}
    upd, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    assert np.all(np.asarray(upd["w"]) < 0)
    for bad in ({"name": "lion"}, {"schedule": "cosine"}):  # unknown / missing total_steps
        with pytest.raises(ValueError):
            OptimizerConfig(**bad)


def test_004_physics_informed_loss_with_pde_residual():
    # residual of the ODE u' = -u on ordered inputs: a PINN-style penalty on predictions
    def residual(pred, inputs):
        dt = inputs[1, 0] - inputs[0, 0]
        return (pred[1:] - pred[:-1]) / dt + 0.5 * (pred[1:] + pred[:-1])

    t = jnp.linspace(0, 1, 11)[:, None]
    exact = jnp.exp(-t)
    loss = get_loss("physics_informed", residual_fn=residual, physics_weight=1.0)
    assert float(loss(exact, exact, inputs=t)) < 1e-4
    wrong = exact + 0.3 * t
    assert float(loss(wrong, exact, inputs=t)) > float(mse_loss(wrong, exact)) + 0.05
    # trainable through the Trainer: the loss gets the batch inputs
    x = np.linspace(0, 1, 64, dtype=np.float32)[:, None]
    y = np.exp(-x).astype(np.float32)
    trainer = Trainer(MLP(1, 1, 16, 1, activation="tanh", key=jax.random.key(0)),
                      TrainingConfig(num_epochs=1, batch_size=64, learning_rate=1e-2,
                                     shuffle=False, print_every=0),
                      loss_fn=get_loss("physics_informed", residual_fn=residual,
                                       physics_weight=0.1))
    _, history = trainer.train((x, y))
    assert len(history["train_loss"]) == 1 and math.isfinite(history["train_loss"][0])
