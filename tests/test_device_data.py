"""Many steps per dispatch (issue 14.5): training arrays on the devices, batches drawn there,
``k`` steps per call; the same batches and results as the host pipeline step by step."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import metrics, run_cli, summary
from helpers import assert_trees_allclose, assert_trees_equal

import distributed as dx
from distributed.core.bcd import single_phase_plan
from distributed.data import DeviceData, make_dataset
from distributed.loop.callbacks import Callback, Hook
from distributed.loop.chunks import chunk_end


def _arrays(n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    x[3, 1] = -0.0  # moved as bits: the sign of zero survives
    return {"x": x, "label": rng.integers(0, 5, size=(n,)).astype(np.int32),
            "mask": rng.random((n, 2, 2)) > 0.5}


@pytest.mark.parametrize("mesh", ["data:8", "data:4,fsdp:2", "data:2,fsdp:2,tensor:2",
                                  "data:1,tensor:8"])
@pytest.mark.parametrize("n, batch, shuffle", [(100, 16, True), (96, 32, False), (37, 8, True)])
def test_device_batches_are_the_host_pipelines_bit_for_bit(mesh, n, batch, shuffle):
    arrays = _arrays(n)
    resident = DeviceData(arrays, dx.make_mesh(mesh), global_batch_size=batch, seed=7,
                          shuffle=shuffle)
    host = iter(make_dataset(arrays, global_batch_size=batch, seed=7, shuffle=shuffle))
    for k in range(3 * n // batch + 2):  # three epochs and more: carried rows included
        want, got = next(host), jax.device_get(next(resident))
        for name in arrays:
            assert got[name].dtype == want[name].dtype
            assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes(), (k, name)
    assert resident.get_state() == {"next_index": 3 * n // batch + 2}


def _loss(model, batch):
    pred = jax.vmap(model)(batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)


def _engine(device_data, *, mesh="data:8", options=None, epochs=4):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    task = dx.Task(model=lambda: eqx.nn.MLP(6, 2, 16, 2, key=jax.random.key(0)),
                   loss_fn=_loss, train={"x": x, "y": np.tanh(x[:, :2])},
                   plan=single_phase_plan(epochs),
                   optimizers={"all": dx.configure_optimizer(3e-3)})
    return dx.build(task, mesh=dx.make_mesh(mesh), batch_size=32, seed=3,
                    key=jax.random.key(1), options=options, device_data=device_data)


def _train(engine, **kw):
    return dx.run_loop(engine.state, engine.step_fn, num_epochs=engine.total_epochs,
                       clock=engine.clock, data_iterator=engine.data, show_progress=False,
                       **kw)


@pytest.mark.parametrize("options", [None, dx.StepOptions(impl="shard_map", grad_accum=2)],
                         ids=["jit", "shard_map_accum"])
def test_many_steps_per_dispatch_equal_step_by_step(options):
    on, off = _engine("on", options=options), _engine("off", options=options)
    assert isinstance(on.data, DeviceData) and not isinstance(off.data, DeviceData)
    a, ra = _train(on, log_every=7)
    b, rb = _train(off, log_every=7)
    assert ra.final_step == rb.final_step == on.total_steps
    assert_trees_allclose(a.model, b.model, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ra.history["train_loss"], rb.history["train_loss"], rtol=1e-5)
    assert int(a.step) == ra.final_step and on.data.get_state() == off.data.get_state()


def test_chunks_end_where_host_work_is_due():
    assert chunk_end(0, 100, periods=[25], boundaries=[1], cap=128) == 1
    assert chunk_end(1, 100, periods=[25, 10], boundaries=[None], cap=128) == 10
    assert chunk_end(20, 23, periods=[25], boundaries=[], cap=128) == 23
    assert chunk_end(30, 1000, periods=[0], boundaries=[40, 35], cap=4) == 34
    # the loop: hooks and logs happen on exactly their steps, in chunks between them
    hooked, logged, calls = [], [], []

    class Writer:
        def write(self, step, record):
            if "loss" in record and "event" not in record:
                logged.append(step)

    engine = _engine("on", epochs=2)
    run_many = engine.step_fn.run_many
    engine.step_fn.run_many = lambda state, step, n: calls.append(n) or run_many(state, step, n)
    _, result = _train(engine, log_every=5, writer=Writer(),
                       hooks=[Hook(lambda info: hooked.append(info.step), every=3)])
    total = result.final_step
    assert sum(calls) == total and max(calls) > 1  # chunks, cut at every hook and log step
    assert hooked == [s for s in range(1, total + 1) if s % 3 == 0] + [total]
    assert logged == [1] + [s for s in range(2, total + 1) if s % 5 == 0]


def test_a_callback_that_needs_every_step_gets_every_step():
    seen = []

    class EveryStep(Callback):
        def on_step_end(self, step, info):
            seen.append((step, int(info.state.step)))

    _, result = _train(_engine("on", epochs=2), log_every=5, callbacks=[EveryStep()])
    assert seen == [(s, s) for s in range(1, result.final_step + 1)]


def test_chunk_metrics_are_each_steps():
    steps, epochs = [], []

    class Writer:
        def write(self, step, record):
            if "loss" in record and "event" not in record:
                steps.append((step, record["loss"]))
            if record.get("event") == "epoch":
                epochs.append((step, record["steps"]))

    a, result = _train(_engine("on", epochs=2), log_every=3, writer=Writer())
    assert epochs == [(7, 7), (13, 6)] and result.final_step == 13  # steps, not chunks
    on = list(steps)
    steps.clear()
    b, _ = _train(_engine("off", epochs=2), log_every=3, writer=Writer())
    assert [s for s, _ in on] == [s for s, _ in steps]
    np.testing.assert_allclose([v for _, v in on], [v for _, v in steps], rtol=1e-5)


def test_chunks_stay_within_the_datas_epochs_whatever_the_loops_clock():
    """A loop whose epochs are not the data's (``num_batches`` longer than the data, or more
    epochs than the plan) draws the same batches on the devices as from the host pipeline."""
    for kw in (dict(num_epochs=1, num_batches=50), dict(num_epochs=4)):
        runs = []
        for mode in ("on", "off"):
            e = _engine(mode, epochs=2 if "num_batches" not in kw else 8)
            if "num_batches" not in kw:
                kw = dict(kw, clock=e.clock)
            state, r = dx.run_loop(e.state, e.step_fn, data_iterator=e.data, show_progress=False,
                                   log_every=1000, **kw)
            runs.append((state, r))
        (a, ra), (b, rb) = runs
        assert ra.final_step == rb.final_step and ra.final_step > 13
        np.testing.assert_allclose(ra.history["train_loss"], rb.history["train_loss"], rtol=1e-5)
        assert_trees_allclose(a.model, b.model, rtol=1e-5, atol=1e-7)


def test_chunks_only_from_the_step_functions_own_device_data():
    e, other = _engine("on", epochs=2), _engine("on", epochs=2)
    calls = []
    run_many = e.step_fn.run_many
    e.step_fn.run_many = lambda state, step, n: calls.append(n) or run_many(state, step, n)
    _, r = dx.run_loop(e.state, e.step_fn, data_iterator=other.data, clock=e.clock,
                       num_epochs=2, show_progress=False)
    assert calls == [] and r.final_step == e.total_steps  # step by step from `other`


def test_callbacks_without_the_base_class_and_early_stopping_subclasses_see_every_step():
    class Duck:  # every hook the loop calls, no `Callback` base class
        def __init__(self):
            self.steps = []

        def on_train_begin(self, state, info):
            pass

        def on_step_end(self, step, info):
            self.steps.append(step)

        def on_epoch_end(self, epoch, metrics):
            return None

        def on_train_end(self, state, history):
            pass

        def final_state(self, state):
            return state

    class Patient(dx.EarlyStopping):
        def __init__(self):
            super().__init__(monitor="train_loss", patience=100)
            self.steps = []

        def on_step_end(self, step, info):
            super().on_step_end(step, info)
            self.steps.append(step)

    duck, patient = Duck(), Patient()
    _, r = _train(_engine("on", epochs=2), log_every=5, callbacks=[duck, patient])
    assert duck.steps == patient.steps == list(range(1, r.final_step + 1))


def test_device_data_refuses_arrays_of_different_lengths_and_counts_its_orders():
    from distributed.data.resident import fits

    mesh = dx.make_mesh("data:8")
    with pytest.raises(ValueError, match=r"different numbers of examples.*'y': 190"):
        DeviceData({"x": np.zeros((200, 2)), "y": np.zeros((190,))}, mesh,
                   global_batch_size=32, seed=0)
    assert fits({"x": np.zeros((1000, 6), np.float32)}, mesh)[0]
    # 64 MiB of bytes, but two epochs' int32 orders on each of the 8 devices: 4 GiB and more
    ok, why = fits({"x": np.zeros((1 << 26,), np.uint8)}, mesh)
    assert not ok and "MiB per process" in why


CLI = ["--model=psf", "--n_train=96", "--n_val=32", "--n_test=32", "--batch_size=16",
       "--epochs_param=2", "--epochs_nonparam=2", "--epochs_complete=1", "--l1_rate=1e-6",
       "--log_every=4", "--checkpoint_every=5", "--progress=log", "--host_devices=8"]


@pytest.mark.slow
def test_cli_bcd_run_on_the_devices_equals_the_host_pipeline_and_resumes_exactly(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    for wd, mode in ((on, "on"), (off, "off")):
        p = run_cli(f"--workdir={wd}", *CLI, f"--device_data={mode}")
        assert p.returncode == 0, p.stderr[-3000:]
    assert "input: on the devices" in (on / "logs" / "process-0.log").read_text()
    a, b = summary(on), summary(off)
    assert a["final_step"] == b["final_step"] == 30
    for key in ("final_train_loss", "final_val_loss", "test_psf_rmse"):
        assert a[key] == pytest.approx(b[key], rel=1e-4), key
    la = {r["step"]: r["loss"] for r in metrics(on) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in metrics(off) if "loss" in r}
    assert la.keys() == lb.keys()
    np.testing.assert_allclose([la[s] for s in la], [lb[s] for s in la], rtol=1e-4)
    assert_trees_allclose(dx.load_model(on / "model.eqx"), dx.load_model(off / "model.eqx"),
                          rtol=1e-4, atol=1e-8)
    # interrupted at step 13 (mid-phase, between checkpoints) and resumed: bit for bit
    cut = tmp_path / "cut"
    p = run_cli(f"--workdir={cut}", *CLI, "--device_data=on", "--max_steps=13")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli(f"--workdir={cut}", *CLI, "--device_data=on")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(cut)["resumed_from_step"] == 13
    assert summary(cut)["params_sha256"] == a["params_sha256"]
    assert_trees_equal(dx.load_model(cut / "model.eqx"), dx.load_model(on / "model.eqx"))
    # a checkpoint of one input resumes with the other: the position is the step
    mixed = tmp_path / "mixed"
    p = run_cli(f"--workdir={mixed}", *CLI, "--device_data=on", "--max_steps=13")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli(f"--workdir={mixed}", *CLI, "--device_data=off")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(mixed)["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-4)


def test_engines_sharing_a_step_share_its_multi_step_compilation():
    first = _engine("on", epochs=1)
    _train(first, log_every=5)
    compiles = []
    listener = lambda event, duration, **_: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(5)  # other rows, same shapes: a new engine, same layout
        x = rng.normal(size=(200, 6)).astype(np.float32)
        task = dataclasses.replace(first.task, train={"x": x, "y": np.tanh(x[:, :2])})
        second = dx.build(task, mesh=first.mesh, batch_size=32, seed=3, key=jax.random.key(2),
                          device_data="on", train_step=first.train_step)
        compiles.clear()
        _, result = _train(second, log_every=5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert result.final_step == second.total_steps
    assert "/jax/core/compile/backend_compile_duration" not in compiles
