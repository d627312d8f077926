"""The single-file model format against the real desisky package (0.9.0), both directions: the
header's ``arch`` is exactly the constructor's keyword arguments; everything else sits beside."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from desisky.io import load_model as desisky_load_model
from desisky.io import save as desisky_save
from desisky.models.broadband import make_broadbandMLP

from distributed import Trainer, TrainingConfig, load_model, read_metadata, save_checkpoint
from distributed.checkpoint import CheckpointError
from distributed.models import MLP, PSFFieldModel, TransformerLM, model_name

X = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)


def _predict(model):
    return np.asarray(jax.vmap(model)(jnp.asarray(X)))


def test_desisky_files_load_here(tmp_path):
    """What desisky's BroadbandTrainer writes (its `_extract_architecture` header)."""
    model = make_broadbandMLP(in_size=6, out_size=4, width_size=16, depth=2,
                              key=jax.random.key(1))
    path = tmp_path / "broadband.eqx"
    desisky_save(path, model, {"schema": 1, "arch": {"in_size": 6, "out_size": 4,
                                                     "width_size": 16, "depth": 2},
                               "training": {"epoch": 3, "test_loss": 0.1}})
    loaded, meta = load_model(path)
    assert isinstance(loaded, eqx.nn.MLP) and meta["training"]["epoch"] == 3
    np.testing.assert_array_equal(_predict(loaded), _predict(model))
    loaded, _ = load_model(path, constructor=make_broadbandMLP)  # desisky's own way
    np.testing.assert_array_equal(_predict(loaded), _predict(model))
    flat = tmp_path / "flat.eqx"  # desisky's legacy flat header: the arch itself
    desisky_save(flat, model, {"in_size": 6, "out_size": 4, "width_size": 16, "depth": 2})
    np.testing.assert_array_equal(_predict(load_model(flat)[0]), _predict(model))


def test_files_written_here_load_in_desisky(tmp_path):
    (x, y) = (X.repeat(8, 0), np.tile(np.arange(4, dtype=np.float32), (40, 1)))
    model = eqx.nn.MLP(6, 4, 16, 2, key=jax.random.key(2))
    cfg = TrainingConfig(epochs=2, batch_size=8, loss="huber", huber_delta=0.25, save_best=True,
                         save_dir=str(tmp_path), run_name="bb", print_every=0)
    trained, _ = Trainer(model, cfg).train((x, y), (x[:10], y[:10]))
    best = tmp_path / "bb" / "best.eqx"
    header = read_metadata(best)
    assert header["arch"] == {"in_size": 6, "out_size": 4, "width_size": 16, "depth": 2}
    assert header["model"] == "equinox.nn.MLP" and header["activation"] == "relu"
    assert header["training"]["test_loss"] == header["training"]["val_loss"]
    theirs, meta = desisky_load_model("broadband", path=best)
    ours, _ = load_model(best)
    np.testing.assert_array_equal(_predict(theirs), _predict(ours))
    assert meta["training"]["epoch"] == header["training"]["epoch"]
    plain = tmp_path / "plain.eqx"  # no metadata at all: still an arch
    save_checkpoint(trained, plain)
    np.testing.assert_array_equal(_predict(desisky_load_model("broadband", path=plain)[0]),
                                  _predict(trained))


def test_every_setting_of_an_mlp_is_rebuilt_faithfully(tmp_path):
    model = eqx.nn.MLP(6, 3, 8, 2, activation=jax.nn.tanh, final_activation=jax.nn.sigmoid,
                       use_final_bias=False, key=jax.random.key(3))
    path = tmp_path / "m.eqx"
    save_checkpoint(model, path)
    header = read_metadata(path)
    assert header["arch"]["use_final_bias"] is False and "use_bias" not in header["arch"]
    assert (header["activation"], header["final_activation"]) == ("tanh", "sigmoid")
    loaded, _ = load_model(path)
    np.testing.assert_array_equal(_predict(loaded), _predict(model))
    with pytest.raises(TypeError, match="use_final_bias"):  # desisky's constructor refuses it
        desisky_load_model("broadband", path=path)


def test_what_cannot_be_rebuilt_is_refused_clearly(tmp_path):
    model = eqx.nn.MLP(6, 3, 8, 1, activation=lambda v: v * 2.0, key=jax.random.key(4))
    path = tmp_path / "m.eqx"
    save_checkpoint(model, path)
    with pytest.raises(CheckpointError, match="activation is None.*load_checkpoint"):
        load_model(path)
    other = tmp_path / "linear.eqx"
    save_checkpoint(eqx.nn.Linear(3, 2, key=jax.random.key(0)), other)
    with pytest.raises(CheckpointError, match="no 'arch'"):
        load_model(other)


@pytest.mark.parametrize("make", [
    lambda k: MLP(6, 3, 8, 2, key=k, activation="gelu", dropout=0.1),
    lambda k: PSFFieldModel(key=k, n_pupil=16, n_pix=16, lambdas=(0.6, 0.8)),
    lambda k: TransformerLM(key=k, vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                            max_len=8),
])
def test_this_packages_models_round_trip(tmp_path, make):
    model = make(jax.random.key(5))
    path = tmp_path / "m.eqx"
    save_checkpoint(model, path)
    header = json.loads(path.read_bytes().split(b"\n", 1)[0])
    assert header["model"] == model_name(model) and header["arch"] == model.arch()
    loaded, _ = load_model(path)
    for a, b in zip(jax.tree.leaves(eqx.filter(loaded, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(model, eqx.is_array)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
