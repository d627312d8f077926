"""Checkpoint cost: how long an asynchronous save blocks training, and what it does to throughput.

1. **Blocking vs synchronous**, for growing states (an MLP + Adam `TrainState` of ~1, 10, 50,
   200 MB, built by `distributed.engine.build`; the CLI's mesh ``data:-1``): the seconds
   `CheckpointManager.save` blocks its caller
   with ``async_save=True`` (device -> host copies and dispatch; the write continues in the
   background) against the seconds a synchronous save (``async_save=False``) takes, repetitions
   interleaved. Target: blocking <= 5% of the synchronous save.
2. **Throughput with checkpoints**: the default command-line job (PSF model, complete cycle,
   12 epochs per phase; its engine from the CLI's assembly, ``make_task`` + ``build_engine``:
   `run_loop` + `PhaseStep`/`TrainStep` + Grain) with an asynchronous checkpoint every
   ``every`` steps (the CLI default, 100; a `Checkpointer` over a `CheckpointManager` made with
   the CLI's settings, saving the data position too) against no checkpoints, runs interleaved,
   each on a fresh engine reusing the first one's compiled step, the final commit wait
   included, warm-up runs (compiles, first save) excluded. Target: >= 97%.

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

    from distributed.engine import build

    state = build(common.mlp_task(width, 2), mesh=mesh, batch_size=64, seed=0,
                  key=jax.random.key(1), with_data=False).state
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
    from distributed.core.mesh import make_mesh

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
    from distributed.checkpoint import CheckpointManager
    from distributed.cli.config import TrainConfig
    from distributed.loop import Checkpointer

    e = cfg.epochs_per_phase
    tcfg = TrainConfig(model=cfg.model, epochs_param=e, epochs_nonparam=e, epochs_complete=e,
                       epochs=3 * e, n_val=8, n_test=8, checkpoint_every=cfg.every,
                       progress="none")
    engines = common.Engines(tcfg)  # the first run's TrainStep serves every later run
    counter = {"n": 0}

    def train(every: int) -> float:
        engine = engines.new()
        ckpt = None
        if every:  # as the CLI makes them (its metadata left out)
            counter["n"] += 1
            manager = CheckpointManager(root / f"train_{counter['n']}",
                                        max_to_keep=tcfg.max_to_keep,
                                        async_save=tcfg.async_checkpoint)
            ckpt = Checkpointer(manager, every_steps=every, data_iterator=engine.data)
        t = time.perf_counter()
        # run_loop commits (waits for) the last save before returning
        _, result = common.run_engine(engine, checkpointer=ckpt, log_every=tcfg.log_every)
        elapsed = time.perf_counter() - t
        engine.data.close()
        if ckpt is not None:
            ckpt.manager.close()
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
