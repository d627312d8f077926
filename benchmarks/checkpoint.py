"""Checkpoint cost: how long an asynchronous save blocks training, and what it does to throughput.

1. **Blocking vs synchronous**, for growing states (an MLP + Adam `TrainState` of ~1, 10, 50,
   200 MB; the CLI's mesh ``data:-1``): the seconds `CheckpointManager.save` blocks its caller
   with ``async_save=True`` (device -> host copies and dispatch; the write continues in the
   background) against the seconds a synchronous save (``async_save=False``) takes, repetitions
   interleaved. Target: blocking <= 5% of the synchronous save.
2. **Throughput with checkpoints**: the default command-line job (PSF model, complete cycle,
   12 epochs per phase, `run_loop` + `TrainStep` + Grain) with an asynchronous checkpoint every
   ``every`` steps (the CLI default, 100) against no checkpoints, runs interleaved, the final
   commit wait included, warm-up runs (compiles, first save) excluded. Target: >= 97%.

    python benchmarks/checkpoint.py [--quick] [--devices=8] [--widths=288,912,2040,4080]
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import common


@dataclasses.dataclass
class Config:
    # MLP(8 -> width -> width -> 2) + Adam moments: state bytes ~= 12 * width^2.
    widths: str = "288,912,2040,4080"  # ~1, 10, 50, 200 MB states
    saves: int = 3  # interleaved async/sync saves per size
    every: int = 100  # throughput: checkpoint every N steps (the CLI default)
    model: str = "psf"  # throughput: the CLI's --model (psf: the default job)
    epochs_per_phase: int = 12  # throughput runs (the CLI default: 3 x 12 x 8 = 288 steps)
    runs: int = 3
    blocking_target: float = 0.05
    throughput_target: float = 0.97
    quick: bool = False
    devices: int = 0


QUICK = dict(widths="64,288", saves=1, every=3, model="mlp", epochs_per_phase=1, runs=1)


def mlp_state(width: int, mesh):
    """A `TrainState` of MLP(8 -> width -> width -> 2) + Adam, every float array filled with
    random numbers (fresh Adam moments are zeros, which would compress to nothing on disk)."""
    import equinox as eqx
    import jax
    import numpy as np

    from distributed import bcd
    from distributed.models import MLP
    from distributed.optim import OptimizerConfig, make_optimizer
    from distributed.state import init_state

    state, _ = init_state(lambda: MLP(8, 2, width, 2, key=jax.random.key(0)),
                          {"all": make_optimizer(OptimizerConfig())},
                          lambda m: {"all": bcd.complete_filter(m)},
                          key=jax.random.key(1), mesh=mesh)
    rng = np.random.default_rng(0)

    def fill(x):
        if not (eqx.is_inexact_array(x) and x.size > 1):
            return x
        return jax.device_put(rng.standard_normal(x.shape, np.float32).astype(x.dtype),
                              x.sharding)

    return jax.tree.map(fill, state)


def tree_bytes(tree) -> int:
    import equinox as eqx
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def time_saves(managers: dict, state, reps: int) -> dict[str, list[float]]:
    """Interleaved async and sync saves of ``state``: blocking, total and sync seconds."""
    step = {"n": 1}
    rec: dict[str, list[float]] = {"async_blocking_s": [], "async_total_s": [], "sync_s": []}

    def save_async():
        m = managers["async"]
        t = time.perf_counter()
        m.save(step["n"], state)
        rec["async_blocking_s"].append(time.perf_counter() - t)
        m.wait()  # not timed: the background write, off the training thread
        rec["async_total_s"].append(m.last_save.total_s)
        step["n"] += 1

    def save_sync():
        t = time.perf_counter()
        managers["sync"].save(step["n"], state)
        rec["sync_s"].append(time.perf_counter() - t)
        step["n"] += 1

    common.interleaved({"async": save_async, "sync": save_sync}, reps)
    return rec


def blocking_vs_sync(cfg: Config, root: Path) -> list[dict]:
    from distributed.checkpoint import CheckpointManager
    from distributed.mesh import make_mesh

    mesh = make_mesh("data:-1")
    out = []
    for width in (int(w) for w in cfg.widths.split(",")):
        state = mlp_state(width, mesh)
        common.block(state)
        managers = {"async": CheckpointManager(root / f"async_{width}", max_to_keep=1),
                    "sync": CheckpointManager(root / f"sync_{width}", max_to_keep=1,
                                              async_save=False)}
        for m in managers.values():  # warm-up: directory creation, handler set-up
            m.save(0, state)
            m.wait()
        rec = time_saves(managers, state, cfg.saves)
        nbytes = managers["sync"].step_bytes(managers["sync"].latest_step())
        for m in managers.values():
            m.close()
        s = {k: common.summarize(v, 4) for k, v in rec.items()}
        ratio = s["async_blocking_s"]["median"] / s["sync_s"]["median"]
        out.append({"width": width, "state_mb": round(tree_bytes(state) / 1e6, 2),
                    "on_disk_mb": round(nbytes / 1e6, 2), **s,
                    "blocking_over_sync": round(ratio, 4),
                    "meets_target": bool(ratio <= cfg.blocking_target)})
    return out


def throughput(cfg: Config, root: Path) -> dict:
    import jax

    from distributed.checkpoint import CheckpointManager
    from distributed.config import TrainConfig
    from distributed.loop import run_loop

    e = cfg.epochs_per_phase
    tcfg = TrainConfig(model=cfg.model, epochs_param=e, epochs_nonparam=e, epochs_complete=e,
                       epochs=3 * e, n_val=8, n_test=8, progress="none")
    warm = common.build_system(dataclasses.replace(tcfg, epochs_param=1, epochs_nonparam=1,
                                                   epochs_complete=1, epochs=1))
    counter = {"n": 0}

    def train(every: int) -> float:
        system = common.build_system(tcfg, mesh=warm.mesh, step=warm.step)
        data = common.system_data(system)
        manager = None
        if every:
            counter["n"] += 1
            manager = CheckpointManager(root / f"train_{counter['n']}", max_to_keep=3)
        t = time.perf_counter()
        state, result = run_loop(system.state, common.phase_step_fn(system), data_iterator=data,
                                 num_epochs=common.total_epochs(system), num_batches=system.spe,
                                 checkpoint_manager=manager, checkpoint_every=0,
                                 checkpoint_every_steps=every, show_progress=False,
                                 log_every=system.cfg.log_every)
        jax.block_until_ready(state)  # run_loop has already waited for the last commit
        elapsed = time.perf_counter() - t
        data.close()
        if manager is not None:
            manager.close()
        train.steps = result.final_step
        return elapsed

    train(0)  # compiles every phase's step, outside the timing
    train(cfg.every)  # and the eager ops of the save path (first save of a process)
    times = common.interleaved({"none": lambda: train(0), "every": lambda: train(cfg.every)},
                               cfg.runs)
    sps = {k: [train.steps / t for t in v] for k, v in times.items()}
    s = {k: common.summarize(v, 2) for k, v in sps.items()}
    ratio = s["every"]["median"] / s["none"]["median"]
    return {"job": f"the CLI's defaults with --model={cfg.model}, {e} epochs per phase",
            "steps": train.steps, "every": cfg.every,
            "saves_per_run": train.steps // cfg.every,
            "steps_per_s_none": s["none"], "steps_per_s_every": s["every"],
            "throughput_ratio": round(ratio, 4),
            "paired_ratio": common.summarize(common.paired_ratios(times["none"],
                                                                  times["every"]), 4),
            "meets_target": bool(ratio >= cfg.throughput_target)}


def run(cfg: Config) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        sizes = blocking_vs_sync(cfg, root)
        tp = throughput(cfg, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    worst = max(s["blocking_over_sync"] for s in sizes)
    return {"sizes": sizes, "worst_blocking_over_sync": worst, "throughput": tp,
            "blocking_target": cfg.blocking_target, "throughput_target": cfg.throughput_target,
            "meets_target": bool(worst <= cfg.blocking_target and tp["meets_target"])}


if __name__ == "__main__":
    common.main("checkpoint", Config, QUICK, run)
