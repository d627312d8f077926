"""K models at once (an ensemble over the mesh axis ``ensemble``) vs K single runs one after
another, side by side in one run.

Both train the CLI's task (the MLP by default: the small models ensembles are for) on the same
data, batch size, optimizer and number of steps, through the CLI's own assembly (``make_task`` +
``build_engine``, then `run_loop` as ``python -m distributed.train`` does):

- **ensemble**: ``--ensemble=K --mesh=ensemble:K`` (with ``--members_per_device`` > 1:
  ``ensemble:K/m,data:...``): one vmapped step trains all K members, member ``i`` from
  ``init_seed = i``;
- **singles**: K runs one after another, run ``i`` with ``--init_seed=i`` on the CLI's default
  mesh (``data:-1``, all devices), each on a fresh engine reusing one compiled `TrainStep`.

Each variant first trains once untimed (compiles excluded; the host input pipeline, whose
engines reuse every compilation: ``--device_data=off``); then repetitions are interleaved
(ensemble, singles, singles, ensemble, ...), every run on a fresh engine built before its clock
starts. Reported: member-samples/s of each (K x steps x batch / seconds; median over
repetitions), the ratio ensemble / singles (target on a GPU: >= 6 for K = 8 on 8 devices), and
the members' final losses next to the single runs' (they are the same training).

    python benchmarks/ensemble.py [--quick] [--devices=8] [--members=8]
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import common


@dataclasses.dataclass
class Config:
    model: str = "mlp"  # a task of distributed.cli.tasks (the CLI's --model)
    members: int = 8  # K
    members_per_device: int = 1  # K / (ensemble axis size)
    batch_size: int = 64
    n_train: int = 512  # 8 steps per epoch
    epochs: int = 10  # mlp (psf: per phase)
    reps: int = 3
    target: float = 6.0  # GPU target; on CPU the figure is reported
    device_data: str = "off"  # build(device_data=...) when the engine has it ("": its default)
    quick: bool = False
    devices: int = 0


QUICK = dict(epochs=2, n_train=256, reps=1)


def train_config(cfg: Config, **kw):
    from distributed.cli.config import TrainConfig

    return TrainConfig(model=cfg.model, batch_size=cfg.batch_size, n_train=cfg.n_train,
                       n_val=8, n_test=8, epochs=cfg.epochs, epochs_param=cfg.epochs,
                       epochs_nonparam=cfg.epochs, epochs_complete=cfg.epochs,
                       progress="none", **kw)


def build_kwargs(cfg: Config) -> dict:
    """``device_data`` for `distributed.engine.build` (when it takes one): "off" times the
    step with the Grain host pipeline, whose engines reuse every compilation."""
    import inspect

    from distributed.engine import build

    takes = "device_data" in inspect.signature(build).parameters
    return {"device_data": cfg.device_data} if cfg.device_data and takes else {}


def timed_run(engine) -> tuple[float, int, dict]:
    """Seconds, steps and final epoch-mean losses of one training run of ``engine``."""
    t = time.perf_counter()
    _, result = common.run_engine(engine, log_every=10**9)
    elapsed = time.perf_counter() - t
    engine.data.close()
    last = {k: v[-1] for k, v in result.history.items() if k.startswith("train_loss")}
    return elapsed, result.final_step, last


def run(cfg: Config) -> dict:
    import jax

    from distributed.cli.tasks import make_task
    from distributed.core.mesh import make_mesh

    k = cfg.members
    axis = k // cfg.members_per_device
    rest = jax.device_count() // axis
    ens_cfg = train_config(cfg, ensemble=k, mesh=f"ensemble:{axis},data:{rest}")
    kw = build_kwargs(cfg)
    ens_mesh, ens_task = make_mesh(ens_cfg.mesh), make_task(ens_cfg)
    shared = {"step": None, "ens": None}

    def ensemble_engine():
        engine = common.make_engine(ens_cfg, ens_mesh, ens_task, train_step=shared["ens"], **kw)
        shared["ens"] = engine.train_step
        return engine

    single_cfgs = [train_config(cfg, init_seed=i) for i in range(k)]
    single_mesh = make_mesh(single_cfgs[0].mesh)
    tasks = [make_task(c) for c in single_cfgs]

    def single_engine(i):
        engine = common.make_engine(single_cfgs[i], single_mesh, tasks[i],
                                    train_step=shared["step"], **kw)
        shared["step"] = engine.train_step
        return engine

    timed_run(ensemble_engine())  # warm-up: compiles
    timed_run(single_engine(0))
    times: dict[str, list[float]] = {"ensemble": [], "singles": []}
    losses: dict[str, dict] = {}
    steps = 0
    for r in range(cfg.reps):
        order = ("ensemble", "singles") if r % 2 == 0 else ("singles", "ensemble")
        for name in order:
            if name == "ensemble":
                engine = ensemble_engine()
                t, steps, last = timed_run(engine)
                losses["ensemble"] = last
            else:
                t = 0.0
                for i in range(k):
                    engine = single_engine(i)  # built before its clock starts
                    dt, steps, last = timed_run(engine)
                    t += dt
                    losses[f"single_{i}"] = last
            times[name].append(t)
    samples = k * steps * cfg.batch_size
    rates = {n: samples / statistics.median(ts) for n, ts in times.items()}
    ratio = rates["ensemble"] / rates["singles"]
    paired = common.paired_ratios(times["singles"], times["ensemble"])
    agree = max(abs(losses["ensemble"][f"train_loss_member{i}"] - losses[f"single_{i}"][
        "train_loss"]) / abs(losses[f"single_{i}"]["train_loss"]) for i in range(k))
    return {
        "members": k, "ensemble_mesh": ens_cfg.mesh, "single_mesh": single_cfgs[0].mesh,
        "steps_per_run": steps,
        "samples_per_s": {n: round(v, 1) for n, v in rates.items()},
        "seconds": {n: common.summarize(ts) for n, ts in times.items()},
        "ratio": round(ratio, 3), "paired_ratios": [round(x, 3) for x in paired],
        "members_vs_singles_max_rel_diff": agree,
        "target": cfg.target,
        "meets_target": ratio >= cfg.target if jax.default_backend() != "cpu" else None,
    }


if __name__ == "__main__":
    common.main("ensemble", Config, QUICK, run)
