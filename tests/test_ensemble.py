"""Ensembles over the mesh axis `ensemble`: member i trains exactly as the single run of its
init seed (or of its swept hyperparameter), checkpoints move between meshes, and the command
line's --ensemble / --sweep / --init_seed with their outputs and refusals."""

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli import assert_one_line_error, run_cli, summary
from helpers import SemiParam, TinyMLP, regression_data
from jax.sharding import PartitionSpec as P

from distributed import Trainer, TrainingConfig, load_model, make_mesh
from distributed.core import bcd
from distributed.core.ensemble import Ensemble, check_ensemble_mesh, member
from distributed.core.losses import mse_loss
from distributed.core.optim import OptimizerConfig, make_optimizer
from distributed.core.step import StepOptions
from distributed.engine import Task, build
from distributed.loop import Checkpointer, RecoveryPolicy, run_loop
from distributed.loop.callbacks import Callback
from distributed.loop.recovery import Guard
from distributed.runtime.signals import StopRequest

REL = 1e-5


def _task(model, opt_cfg=None, sweepable=False, epochs=3, plan=None, blocks=None):
    kw = {} if blocks is None else {"blocks": blocks}
    opt_cfg = opt_cfg or OptimizerConfig()
    optimizers = {b: make_optimizer(opt_cfg, sweepable=sweepable)
                  for b in (("all",) if blocks is None else ("param", "nonparam"))}
    return Task(model=model, loss_fn=lambda m, b: mse_loss(m(b["x"]), b["y"], as_ratio=True),
                train=regression_data(128, seed=0), val=regression_data(40, seed=1),
                plan=plan or bcd.single_phase_plan(epochs), optimizers=optimizers, **kw)


def _train(engine, **kw):
    state, result = run_loop(engine.state, engine.step_fn, data_iterator=engine.data,
                             num_epochs=engine.total_epochs, clock=engine.clock,
                             evaluate=engine.evaluator, show_progress=False, log_every=10**6,
                             **kw)
    engine.data.close()
    return state, result.history


def _tiny(key):
    return TinyMLP((4, 16, 2), key=key)


def _ensemble_run(task, ensemble, mesh="ensemble:4,data:2", impl="jit"):
    engine = build(task, mesh=make_mesh(mesh), batch_size=16, seed=0, key=jax.random.key(0),
                   ensemble=ensemble, options=StepOptions(impl=impl))
    return engine, *_train(engine)


def _single_run(task, seed):
    engine = build(task, mesh=make_mesh("data:8"), batch_size=16, seed=0,
                   key=jax.random.key(seed))
    return _train(engine)


def _close(a, b, rel=REL):
    return abs(a - b) <= rel * abs(b)


def test_member_equals_the_single_run_of_its_init_seed():
    seeds = (3, 4, 5, 6)
    engine, state, hist = _ensemble_run(_task(_tiny), Ensemble(seeds))
    assert engine.state.model.layers[0].weight.shape[0] == 4
    for i, seed in enumerate(seeds):
        single, h = _single_run(_task(lambda s=seed: _tiny(jax.random.key(s))), seed)
        assert _close(hist[f"train_loss_member{i}"][-1], h["train_loss"][-1])
        assert _close(hist[f"val_loss_member{i}"][-1], h["val_loss"][-1])
        for a, b in zip(jax.tree.leaves(member(state.model, i)), jax.tree.leaves(single.model),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the members differ (different seeds), and the ensemble's loss is their mean
    finals = [hist[f"train_loss_member{i}"][-1] for i in range(4)]
    assert len(set(finals)) == 4
    assert hist["train_loss"][-1] == pytest.approx(np.mean(finals), rel=1e-6)


@pytest.mark.parametrize("name,field,values", [
    ("adam", "learning_rate", (1e-3, 1e-2)),
    ("adam", "weight_decay", (0.0, 0.05)),
    ("adamw", "weight_decay", (0.0, 0.05)),
])
def test_sweep_member_equals_the_single_run_with_its_value(name, field, values):
    base = OptimizerConfig(name=name, schedule="cosine", total_steps=30, warmup_steps=3)
    ens = Ensemble((7, 7), {"all": {field: values}})
    _, _, hist = _ensemble_run(_task(_tiny, base, sweepable=True), ens, mesh="ensemble:2,data:4")
    for i, v in enumerate(values):
        cfg = dataclasses.replace(base, **{field: v})
        _, h = _single_run(_task(lambda: _tiny(jax.random.key(7)), cfg), 7)
        assert _close(hist[f"train_loss_member{i}"][-1], h["train_loss"][-1])
        assert _close(hist[f"val_loss_member{i}"][-1], h["val_loss"][-1])
    assert hist["train_loss_member0"][-1] != hist["train_loss_member1"][-1]


@pytest.mark.parametrize("cfg", [
    OptimizerConfig(), OptimizerConfig(name="adamw", weight_decay=0.1),
    OptimizerConfig(name="sgd", momentum=0.9, weight_decay=0.01, schedule="exponential",
                    alpha=0.1, transition_steps=2),
    OptimizerConfig(schedule="cosine_warm_restarts", T0=3, grad_clip_norm=0.5),
])
def test_a_sweepable_optimizer_updates_exactly_as_the_plain_one(cfg):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.1, params)
    outs = []
    for sweepable in (False, True):
        tx = make_optimizer(cfg, sweepable=sweepable)
        state, p, ups = tx.init(params), params, []
        for _ in range(7):
            u, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, u)
            ups.append(u)
        outs.append(ups)
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-9)


def test_ensemble_state_layout_and_sharding():
    engine = build(_task(_tiny), mesh=make_mesh("ensemble:4,data:2"), batch_size=16, seed=0,
                   key=jax.random.key(0), ensemble=Ensemble((0, 1, 2, 3)), with_data=False)
    s = engine.state
    w = s.model.layers[0].weight
    assert w.shape == (4, 16, 4) and w.sharding.spec == P("ensemble")
    assert s.key.shape == (4,)
    assert s.step.shape == s.phase.shape == s.lr_scale.shape == s.nonfinite_count.shape == ()
    # member i's parameters are those of its seed's model
    np.testing.assert_array_equal(member(s.model, 2).layers[0].weight,
                                  _tiny(jax.random.key(2)).layers[0].weight)
    with pytest.raises(ValueError, match="do not split evenly over the mesh's ensemble axis"):
        check_ensemble_mesh(3, make_mesh("ensemble:4,data:2"))
    with pytest.raises(ValueError, match="function key -> model"):
        build(_task(_tiny(jax.random.key(0))), mesh=make_mesh("ensemble:4,data:2"),
              batch_size=16, seed=0, key=jax.random.key(0), ensemble=Ensemble((0, 1, 2, 3)))
    with pytest.raises(ValueError, match="sweepable=True"):
        build(_task(_tiny), mesh=make_mesh("ensemble:2,data:4"), batch_size=16, seed=0,
              key=jax.random.key(0), with_data=False,
              ensemble=Ensemble((0, 1), {"all": {"learning_rate": (1e-3, 1e-2)}}))


def test_shard_map_ensemble_step_equals_jit():
    ens = Ensemble((1, 2, 3, 4))
    _, _, a = _ensemble_run(_task(_tiny, epochs=2), ens, impl="jit")
    _, _, b = _ensemble_run(_task(_tiny, epochs=2), ens, impl="shard_map")
    for i in range(4):
        assert _close(b[f"train_loss_member{i}"][-1], a[f"train_loss_member{i}"][-1])


def test_bcd_phases_run_per_member_with_the_first_run_rule():
    plan = bcd.make_phase_plan("complete", epochs_param=1, epochs_nonparam=1,
                               epochs_complete=1, first_run=True)
    mk = lambda key: SemiParam(key=key)  # noqa: E731
    t = _task(mk, plan=plan, blocks=bcd.model_blocks)
    _, _, hist = _ensemble_run(t, Ensemble((0, 1)), mesh="ensemble:2,data:4")
    for i in range(2):
        ts = _task(lambda s=i: mk(jax.random.key(s)), plan=plan, blocks=bcd.model_blocks)
        _, h = _single_run(ts, i)
        assert _close(hist[f"train_loss_member{i}"][-1], h["train_loss"][-1])
        assert _close(hist[f"val_loss_member{i}"][-1], h["val_loss"][-1])


def test_a_member_with_a_non_finite_update_is_skipped_alone():
    engine = build(_task(_tiny), mesh=make_mesh("ensemble:2,data:4"), batch_size=16, seed=0,
                   key=jax.random.key(0), ensemble=Ensemble((0, 1)))
    w = engine.state.model.layers[0].weight
    state = eqx.tree_at(lambda s: s.model.layers[0].weight, engine.state,
                        jax.device_put(w.at[1, 0, 0].set(jnp.nan), w.sharding))
    before = jax.tree.map(np.asarray, state.model)
    new, metrics = engine.step_fn(state, next(engine.data), step=0)
    engine.data.close()
    after = jax.tree.map(np.asarray, new.model)
    assert not np.array_equal(after.layers[1].weight[0], before.layers[1].weight[0])
    np.testing.assert_array_equal(after.layers[1].weight[1], before.layers[1].weight[1])
    assert int(metrics["finite"]) == 1 and int(new.nonfinite_count) == 0
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["loss_member1"]))


def test_a_members_epoch_losses_leave_out_the_steps_it_alone_skipped():
    """Member i's ``train_loss_member<i>`` is the mean over the steps member i updated, as its
    single run's ``train_loss`` is over its own (the members skip different steps here)."""

    def loss(m, b):  # NaN when the sign of sum(w) * sum(x0) is negative: member and batch
        w = jax.tree.leaves(m)[0]
        nan_if_negative = jnp.sqrt(jnp.sum(w) * jnp.sum(b["x"][:, 0]))
        return jnp.mean((m(b["x"]) - b["y"]) ** 2) + 0.0 * nan_if_negative

    def task(model):
        return Task(model=model, loss_fn=loss, train=regression_data(128, seed=0),
                    plan=bcd.single_phase_plan(3),
                    optimizers={"all": make_optimizer(OptimizerConfig())})

    engine = build(task(_tiny), mesh=make_mesh("ensemble:2,data:4"), batch_size=16, seed=0,
                   key=jax.random.key(0), ensemble=Ensemble((0, 1)))
    _, history = _train(engine)
    skipped = []
    for i in (0, 1):
        single = build(task(lambda i=i: _tiny(jax.random.key(i))), mesh=make_mesh("data:8"),
                       batch_size=16, seed=0, key=jax.random.key(i))
        state, h = _train(single)
        skipped.append(int(state.nonfinite_count))
        np.testing.assert_allclose(history[f"train_loss_member{i}"], h["train_loss"], rtol=REL)
    assert all(0 < k < engine.total_steps for k in skipped), skipped


@pytest.mark.parametrize("mesh,devices", [("ensemble:2,data:2", 4), ("data:1", 1)])
def test_an_ensemble_checkpoint_restores_on_another_mesh_and_continues(tmp_path, mesh, devices):
    ens = Ensemble((0, 1, 2, 3))
    full = _ensemble_run(_task(_tiny), ens)[2]
    first = build(_task(_tiny), mesh=make_mesh("ensemble:4,data:2"), batch_size=16, seed=0,
                  key=jax.random.key(0), ensemble=ens)
    ckpt = Checkpointer(str(tmp_path), data_iterator=first.data)
    _train(first, checkpointer=ckpt, max_steps=11)
    ckpt.close()
    other = build(_task(_tiny), mesh=make_mesh(mesh, devices=jax.devices()[:devices]),
                  batch_size=16, seed=0, key=jax.random.key(0), ensemble=ens)
    ckpt = Checkpointer(str(tmp_path), data_iterator=other.data)
    state, hist = _train(other, checkpointer=ckpt, resume=True)
    ckpt.close()
    assert ckpt.restored["step"] == 11 and int(state.step) == 24
    for i in range(4):
        assert _close(hist[f"train_loss_member{i}"][-1], full[f"train_loss_member{i}"][-1])
        assert _close(hist[f"val_loss_member{i}"][-1], full[f"val_loss_member{i}"][-1])


def test_a_preempted_ensemble_resumes_to_the_same_members(tmp_path):
    ens = Ensemble((0, 1, 2, 3))
    full = _ensemble_run(_task(_tiny), ens)[2]
    stop = StopRequest()

    class PreemptAt(Callback):
        def on_step_end(self, step, info):
            if step == 6:
                stop.trigger()

    first = build(_task(_tiny), mesh=make_mesh("ensemble:4,data:2"), batch_size=16, seed=0,
                  key=jax.random.key(0), ensemble=ens)
    ckpt = Checkpointer(str(tmp_path), data_iterator=first.data)
    state, result = run_loop(first.state, first.step_fn, data_iterator=first.data,
                             num_epochs=first.total_epochs, clock=first.clock, show_progress=False,
                             checkpointer=ckpt, stop=stop, callbacks=[PreemptAt()])
    first.data.close()
    ckpt.close()
    assert result.stopped_by == "preempted" and result.final_step < 24
    again = build(_task(_tiny), mesh=make_mesh("ensemble:4,data:2"), batch_size=16, seed=0,
                  key=jax.random.key(0), ensemble=ens)
    ckpt = Checkpointer(str(tmp_path), data_iterator=again.data)
    _, hist = _train(again, checkpointer=ckpt, resume=True)
    ckpt.close()
    for i in range(4):
        assert _close(hist[f"val_loss_member{i}"][-1], full[f"val_loss_member{i}"][-1])


def test_loss_explosion_recovery_rolls_the_whole_ensemble_back():
    engine = build(_task(_tiny), mesh=make_mesh("ensemble:2,data:4"), batch_size=16, seed=0,
                   key=jax.random.key(0), ensemble=Ensemble((0, 1)))
    guard = Guard(RecoveryPolicy(explosion_factor=10.0, window=4, snapshot_every=2))
    state, step = engine.state, 0
    for _ in range(6):
        state, metrics = engine.step_fn(state, next(engine.data), step=step)
        step += 1
        guard.observe(step, state)
        state = guard.check(step, {"loss": float(metrics["loss"])}, state)
    good_step, good = guard._good
    rolled = guard.check(step, {"loss": 1e9}, state)
    engine.data.close()
    assert float(rolled.lr_scale) == 0.5 and int(rolled.step) == step
    for a, b in zip(jax.tree.leaves(rolled.model), jax.tree.leaves(good.model), strict=True):
        np.testing.assert_array_equal(a, b)  # every member back to the same good step
    assert rolled.model.layers[0].weight.sharding == state.model.layers[0].weight.sharding


def test_trainer_trains_an_ensemble_and_a_sweep():
    data, val = regression_data(128, seed=0), regression_data(32, seed=1)
    xy, vxy = (data["x"], data["y"]), (val["x"], val["y"])
    mk = lambda key: eqx.nn.MLP(4, 2, 16, 1, key=key)  # noqa: E731
    common = dict(epochs=3, batch_size=16, print_every=0)
    t = Trainer(mk, TrainingConfig(**common, ensemble=4, early_stopping_patience=2),
                mesh=make_mesh("ensemble:4,data:2"))
    model, h = t.train(xy, vxy)
    assert model.layers[0].weight.shape[0] == 4 and t.predict(val["x"]).shape == (32, 2)
    assert h.best_val_loss is not None and len(h["val_loss_member3"]) == 3
    _, h2 = Trainer(mk(jax.random.key(2)), TrainingConfig(**common),
                    mesh=make_mesh("data:8")).train(xy, vxy)
    assert _close(h["train_loss_member2"][-1], h2["train_loss"][-1])
    sweep = Trainer(mk, TrainingConfig(**common, sweep={"learning_rate": [1e-3, 1e-2]}),
                    mesh=make_mesh("ensemble:2,data:4"))
    _, hs = sweep.train(xy, vxy)
    _, h3 = Trainer(mk, TrainingConfig(**common, learning_rate=1e-2),
                    mesh=make_mesh("data:8")).train(xy, vxy)
    assert _close(hs["train_loss_member1"][-1], h3["train_loss"][-1])
    with pytest.raises(ValueError, match="key -> model"):
        Trainer(mk(jax.random.key(0)), TrainingConfig(**common, ensemble=2))
    with pytest.raises(ValueError, match="one per member"):
        TrainingConfig(**common, ensemble=3, sweep={"learning_rate": [1e-3, 1e-2]})


# ----------------------------------------------------------------------------- command line
MLP = ("--host_devices=8", "--model=mlp", "--epochs=3", "--n_train=256", "--n_val=64",
       "--progress=none", "--checkpoint_every=8")


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ens") / "run"
    proc = run_cli(f"--workdir={wd}", *MLP, "--ensemble=4", "--mesh=ensemble:4,data:2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd


def _assert_member_is_the_single_run(member_summary, workdir, *flags):
    """A CLI single run with ``flags`` ends with ``member_summary``'s final losses."""
    proc = run_cli(f"--workdir={workdir}", *MLP, *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = summary(workdir)
    assert _close(member_summary["final_train_loss"], one["final_train_loss"])
    assert _close(member_summary["final_val_loss"], one["final_val_loss"])


def test_cli_member_equals_the_init_seed_run(ensemble_run, tmp_path):
    s = summary(ensemble_run)
    assert [m["init_seed"] for m in s["members"]] == [0, 1, 2, 3]
    assert s["mesh"]["ensemble"] == 4 and s["best_member"] in range(4)
    best = min(s["members"], key=lambda m: m["final_val_loss"])
    assert s["best_member"] == best["member"]
    for m in s["members"]:
        assert {"init_seed", "hyperparameters", "final_train_loss", "final_val_loss",
                "params_sha256"} <= set(m)
        assert m["hyperparameters"] == {"learning_rate": 1e-3, "weight_decay": 0.0}
    _assert_member_is_the_single_run(s["members"][2], tmp_path / "one", "--init_seed=2")


def test_cli_export_predict_and_report_hold_every_member(ensemble_run, tmp_path):
    model, meta = load_model(ensemble_run / "model.eqx")
    assert meta["ensemble"]["members"] == 4 and model.layers[0].weight.shape[0] == 4
    x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    proc = run_cli(f"--model={ensemble_run}", f"--data={tmp_path / 'in.npz'}",
                   f"--out={tmp_path / 'out.npz'}", module="distributed.predict")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    members = np.stack([np.asarray(member(model, i)(x)) for i in range(4)])
    np.testing.assert_allclose(out["pred_members"], members, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["pred"], members.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["pred_std"], members.std(0), rtol=1e-4, atol=1e-6)
    assert out["pred_std"].min() > 0
    proc = run_cli(str(ensemble_run), f"--out={tmp_path / 'report'}", module="distributed.report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "report" / "members.png").is_file()
    assert "member 3" in (tmp_path / "report" / "report.txt").read_text()


def test_cli_sweep_member_equals_the_run_with_that_learning_rate(tmp_path):
    proc = run_cli(f"--workdir={tmp_path / 'sweep'}", *MLP, "--sweep=learning_rate:1e-3,1e-2",
                   "--mesh=ensemble:2,data:4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(tmp_path / "sweep")
    assert [m["init_seed"] for m in s["members"]] == [0, 0]
    assert [m["hyperparameters"]["learning_rate"] for m in s["members"]] == [1e-3, 1e-2]
    _assert_member_is_the_single_run(s["members"][1], tmp_path / "one", "--learning_rate=1e-2")


def test_cli_ensemble_checkpoint_restores_on_four_devices(ensemble_run, tmp_path):
    wd = tmp_path / "moved"
    proc = run_cli(f"--workdir={wd}", *MLP, "--ensemble=4", "--mesh=ensemble:4,data:2",
                   "--max_steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = [a for a in MLP if not a.startswith("--host_devices")]
    proc = run_cli(f"--workdir={wd}", "--host_devices=4", *args, "--ensemble=4",
                   "--mesh=ensemble:2,data:2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    moved, full = summary(wd), summary(ensemble_run)
    assert moved["resumed_from_step"] == 8 and moved["device_count"] == 4
    for a, b in zip(moved["members"], full["members"], strict=True):
        assert _close(a["final_train_loss"], b["final_train_loss"])
        assert _close(a["final_val_loss"], b["final_val_loss"])


@pytest.mark.parametrize("args,needles", [
    (("--ensemble=3", "--mesh=ensemble:4,data:2"), ("--ensemble=3", "ensemble axis of size 4")),
    (("--ensemble=4", "--sweep=learning_rate:1e-3,1e-2"), ("2 values", "--ensemble=4")),
    (("--sweep=momentum:0.9,0.99",), ("unknown sweep field 'momentum'", "learning_rate")),
    (("--model=psf", "--sweep=learning_rate:1e-3,1e-2"), ("does not use --learning_rate",
                                                           "lr_param")),
], ids=["members_not_a_multiple", "sweep_values_not_k", "unknown_sweep_field",
        "field_the_model_does_not_use"])
def test_cli_refuses_bad_ensembles_in_one_line(tmp_path, args, needles):
    wd = tmp_path / "bad"
    model = () if any(a.startswith("--model") for a in args) else ("--model=mlp",)
    proc = run_cli(f"--workdir={wd}", "--host_devices=8", *model, *args)
    assert_one_line_error(proc, *needles)
    assert not wd.exists()


def test_init_seed_changes_the_model_but_not_the_data(tmp_path):
    from distributed.cli.config import TrainConfig
    from distributed.cli.tasks import make_task

    a, b = (make_task(TrainConfig(model="mlp", init_seed=s)).task for s in (-1, 5))
    assert all(np.array_equal(a.train[k], b.train[k]) for k in a.train)
    wa, wb = (t.model().layers[0].weight for t in (a, b))
    assert not np.array_equal(wa, wb)
    np.testing.assert_array_equal(
        make_task(TrainConfig(model="mlp", seed=5)).task.model().layers[0].weight, wb)
    assert json.dumps(TrainConfig(init_seed=5).to_dict())  # a config field like the others
