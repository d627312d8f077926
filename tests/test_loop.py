"""`train_loop` keeps seed 002's contract: signature, history, Orbax checkpoints, validation,
callbacks and hooks, and it reads device values only at log points and epoch ends."""

import inspect
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distributed.checkpoint import CheckpointManager
from distributed.loop import run_loop, train_loop
from distributed.loop.callbacks import Callback, Hook

OPT = optax.sgd(0.1)
W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)


class LinState(eqx.Module):
    step: jax.Array
    w: jax.Array
    opt_state: Any


def new_state():
    w = jnp.zeros(3)
    return LinState(jnp.zeros((), jnp.int32), w, OPT.init(w))


@jax.jit
def train_step(state, batch, rng_key):
    def loss_fn(w):
        return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(state.w)
    upd, opt = OPT.update(g, state.opt_state, state.w)
    metrics = {"loss": loss, "gnorm": optax.tree.norm(g), "id": state.step + 1}
    return LinState(state.step + 1, optax.apply_updates(state.w, upd), opt), metrics


@jax.jit
def val_step(state, batch, rng_key):
    return state, {"loss": jnp.mean((batch["x"] @ state.w - batch["y"]) ** 2)}


def batches(n_batches=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_batches * size, 3)).astype(np.float32)
    y = x @ W_TRUE
    return [{"x": x[i:i + size], "y": y[i:i + size]} for i in range(0, len(x), size)]


TRAIN = batches()
VAL = batches(seed=1)


def test_signature_is_seed_002s():
    params = inspect.signature(train_loop).parameters
    expected = [("state", inspect.Parameter.empty), ("train_step_fn", inspect.Parameter.empty),
                ("data_iterator_fn", inspect.Parameter.empty),
                ("num_epochs", inspect.Parameter.empty), ("num_batches", inspect.Parameter.empty),
                ("rng_key", inspect.Parameter.empty), ("checkpoint_dir", None),
                ("checkpoint_every", 1), ("val_step_fn", None), ("val_data_iterator", None),
                ("val_num_batches", None), ("show_progress", True)]
    assert [(n, params[n].default) for n, _ in expected] == expected


def test_history_and_orbax_checkpoints(tmp_path):
    final, history = train_loop(new_state(), train_step, lambda: iter(TRAIN), num_epochs=4,
                                num_batches=4, rng_key=jax.random.key(0),
                                checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2,
                                show_progress=False)
    assert set(history) == {"train_loss", "train_gnorm", "train_id"}
    assert all(len(v) == 4 for v in history.values())
    assert history["train_loss"][-1] < 0.1 * history["train_loss"][0]
    assert history["train_id"] == [2.5, 6.5, 10.5, 14.5]  # per-epoch means of the step ids
    with CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.all_steps() == [8, 16]  # every 2 epochs of 4 batches
        restored, _, step = mngr.restore(new_state())
    assert step == 16
    np.testing.assert_array_equal(np.asarray(restored.w), np.asarray(final.w))


def test_validation_iterator_is_consumed_once_and_reused():
    pulled = []

    def val_data_iterator():
        for b in VAL:
            pulled.append(1)
            yield b

    _, history = train_loop(new_state(), train_step, lambda: iter(TRAIN), num_epochs=3,
                            num_batches=4, rng_key=None, val_step_fn=val_step,
                            val_data_iterator=val_data_iterator(), val_num_batches=2,
                            show_progress=False)
    assert len(pulled) == 2  # two batches taken once, reused by all three validations
    assert len(history["val_loss"]) == 3
    assert history["val_loss"][0] > history["val_loss"][1] > history["val_loss"][2]


def test_callbacks_in_order_hooks_every_n_and_stop():
    events = []

    class Recorder(Callback):
        def on_train_begin(self, state, info):
            events.append(("begin", info.step))

        def on_step_end(self, step, info):
            events.append(("step", step))

        def on_epoch_end(self, epoch, metrics):
            events.append(("epoch", epoch, round(metrics["train_loss"], 6)))
            return epoch == 1  # stop after the second epoch

        def on_train_end(self, state, history):
            events.append(("end", len(history["train_loss"])))

    hooked = []
    _, history = train_loop(new_state(), train_step, lambda: iter(TRAIN), num_epochs=5,
                            num_batches=4, rng_key=None, show_progress=False,
                            callbacks=[Recorder()],
                            hooks=[Hook(lambda i: hooked.append((i.step, i.final)), every=3)])
    kinds = [e[0] for e in events]
    assert kinds == ["begin"] + ["step"] * 4 + ["epoch"] + ["step"] * 4 + ["epoch", "end"]
    assert [e[1] for e in events if e[0] == "step"] == list(range(1, 9))
    assert events[5][2] == round(history["train_loss"][0], 6)
    assert events[-1] == ("end", 2)
    assert hooked == [(3, False), (6, False), (8, True)]


def test_device_values_are_read_only_at_log_points(monkeypatch):
    log = []
    real_get = jax.device_get

    def step_fn(state, batch, key):
        new, metrics = train_step(state, batch, key)
        log.append(("dispatch", len([e for e in log if e[0] == "dispatch"]) + 1))
        return new, metrics

    def counting_get(x):
        out = real_get(x)
        ids = [int(d["id"]) for d in (out if isinstance(out, list) else [out])
               if isinstance(d, dict) and "id" in d]
        log.append(("read", ids))
        return out

    monkeypatch.setattr(jax, "device_get", counting_get)
    nb, epochs = 8, 2
    data = batches(n_batches=nb, size=8)
    run_loop(new_state(), step_fn, data_iterator_fn=lambda: iter(data), num_epochs=epochs,
             num_batches=nb, log_every=4, show_progress=False)
    reads = [e[1] for e in log if e[0] == "read"]
    single = [ids[0] for ids in reads if len(ids) == 1]
    assert single == [1, 4, 8, 12, 16]  # log points only: step 1 and every 4th
    assert sorted(len(ids) for ids in reads if len(ids) > 1) == [nb, nb]  # one per epoch end
    assert len(reads) <= 5 + epochs + 1  # (+1: the state's step, read once at the start)
    for i, event in enumerate(log):  # a step's metrics are read after the next dispatch
        if event[0] == "read" and len(event[1]) == 1 and event[1][0] % nb:
            dispatched = [e[1] for e in log[:i] if e[0] == "dispatch"]
            assert dispatched[-1] == event[1][0] + 1


@pytest.mark.parametrize("bad", [0, None])
def test_num_batches_must_be_positive(bad):
    with pytest.raises(ValueError, match="num_batches"):
        train_loop(new_state(), train_step, lambda: iter(TRAIN), 1, bad, None)
