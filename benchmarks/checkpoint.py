"""Checkpoint cost: how long an asynchronous save blocks training, and what it does to throughput.

1. **Blocking vs synchronous**, for growing states (an MLP + Adam `TrainState` of ~1, 10, 50,
   200 MB, built by `distributed.engine.build`; the CLI's mesh ``data:-1``): the seconds
   `CheckpointManager.save` blocks its caller
   with ``async_save=True`` (on-device snapshot and checksums dispatched; Orbax's save runs on
   the manager's worker thread) against the seconds a synchronous save (``async_save=False``)
   takes, repetitions interleaved. Target: blocking <= 5% of the synchronous save from 10 MB
   up, and <= 30 ms at 1 MB. The **first** save of a fresh manager is timed too (after
   ``manager.warm(state)``, which compiles what the save runs on the devices): target, no
   slower than the others.
   **Remedies** (``remedies``): the same async save with the blocking-part remedies switched
   on one by one, interleaved: ``before`` (checksums over every replica, read in the caller;
   Orbax's replica-parallel slicing; Orbax's save in the caller), ``+one_replica``
   (`deferred.save_view`), ``+deferred_checksums`` (read in Orbax's commit thread), ``+worker``
   (on-device snapshot, Orbax's save on a worker thread: the default).
2. **Throughput with checkpoints**: the default command-line job (PSF model, complete cycle,
   12 epochs per phase; its engine from the CLI's assembly, ``make_task`` + ``build_engine``:
   `run_loop` + `PhaseStep`/`TrainStep` + Grain) with an asynchronous checkpoint every
   ``every`` steps (the CLI default, 100; a `Checkpointer` over a `CheckpointManager` made with
   the CLI's settings, saving the data position too) against no checkpoints, runs interleaved,
   each on a fresh engine reusing the first one's compiled step, the final commit wait
   included, warm-up runs (compiles, first save) excluded. Target: >= 97%. A third variant
   saves the same checkpoints without their per-array checksums (``checksums_ratio``: with /
   without, the cost of the checksums in training throughput).

    python benchmarks/checkpoint.py [--quick] [--devices=8] [--widths=288,912,2040,4080]
"""

from __future__ import annotations

import contextlib
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
    first_slack_s: float = 0.005  # first save: at most the slowest other save, or median + this
    small_target_s: float = 0.030  # blocking at the first (~1 MB) size
    remedies: str = "288,912"  # widths for the remedy ladder ("" to skip)
    remedy_saves: int = 5
    quick: bool = False
    devices: int = 0


QUICK = dict(widths="64,288", saves=1, every=3, model="mlp", epochs_per_phase=1, runs=1,
             remedies="64", remedy_saves=1)
REMEDIES = ("before", "+one_replica", "+deferred_checksums", "+worker")


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


def first_save(manager, state) -> float:
    """Blocking seconds of a fresh manager's first save, after ``warm`` (untimed)."""
    manager.warm(state)
    t = time.perf_counter()
    manager.save(0, state)
    elapsed = time.perf_counter() - t
    manager.wait()
    return elapsed


def blocking_vs_sync(cfg: Config, root: Path) -> list[dict]:
    from distributed.checkpoint import CheckpointManager
    from distributed.core.mesh import make_mesh

    mesh = make_mesh("data:-1")
    out = []
    for i, width in enumerate(int(w) for w in cfg.widths.split(",")):
        state = mlp_state(width, mesh)
        common.block(state)
        managers = {"async": CheckpointManager(root / f"async_{width}", max_to_keep=1),
                    "sync": CheckpointManager(root / f"sync_{width}", max_to_keep=1,
                                              async_save=False)}
        first = first_save(managers["async"], state)
        managers["sync"].warm(state)  # the sync warm-up save: directory creation, handlers
        managers["sync"].save(0, state)
        rec = time_saves(managers, state, cfg.saves)
        nbytes = managers["sync"].step_bytes(managers["sync"].latest_step())
        for m in managers.values():
            m.close()
        s = {k: common.summarize(v, 4) for k, v in rec.items()}
        blocking = s["async_blocking_s"]["median"]
        ratio = blocking / s["sync_s"]["median"]
        first_ok = first <= max(s["async_blocking_s"]["max"], blocking + cfg.first_slack_s)
        meets = ratio <= cfg.blocking_target if i else blocking <= cfg.small_target_s
        out.append({"width": width, "state_mb": round(tree_bytes(state) / 1e6, 2),
                    "on_disk_mb": round(nbytes / 1e6, 2), **s,
                    "blocking_over_sync": round(ratio, 4),
                    "first_save_blocking_s": round(first, 4),
                    "first_over_median": round(first / blocking, 3),
                    "first_no_slower": bool(first_ok),
                    "meets_target": bool(meets and first_ok)})
    return out


@contextlib.contextmanager
def remedy(name: str, manager):
    """Switch the save path's remedies up to ``name`` (in `REMEDIES` order) on ``manager``."""
    from distributed.checkpoint import deferred
    from distributed.checkpoint import manager as module

    level = REMEDIES.index(name)
    saved = module.save_view, module.DEFERRED, manager._worker
    module.save_view = deferred.save_view if level >= 1 else (lambda flat: flat)
    module.DEFERRED = level >= 2
    manager._worker = saved[2] if level >= 3 else None
    try:
        yield
    finally:
        module.save_view, module.DEFERRED, manager._worker = saved


def remedy_ladder(cfg: Config, root: Path, state) -> dict[str, list[float]]:
    """Interleaved async saves of ``state``, one manager per remedy level."""
    from distributed.checkpoint import CheckpointManager

    managers = {n: CheckpointManager(root / f"remedy_{i}", max_to_keep=1)
                for i, n in enumerate(REMEDIES)}
    step = {"n": 0}

    def save(name):
        m = managers[name]
        with remedy(name, m):
            t = time.perf_counter()
            m.save(step["n"], state)
            elapsed = time.perf_counter() - t
            m.wait()  # untimed: the commit
        step["n"] += 1
        return elapsed

    for n in REMEDIES:  # warm-up: compiles, directories
        save(n)
    rec: dict[str, list[float]] = {n: [] for n in REMEDIES}
    for r in range(cfg.remedy_saves):
        for n in (REMEDIES if r % 2 == 0 else REMEDIES[::-1]):
            rec[n].append(save(n))
    for m in managers.values():
        m.close()
    return rec


def remedies(cfg: Config, root: Path) -> list[dict]:
    """The async save's blocking seconds with the remedies switched on one by one."""
    from distributed.core.mesh import make_mesh

    mesh = make_mesh("data:-1")
    out = []
    for width in (int(w) for w in cfg.remedies.split(",") if w):
        state = mlp_state(width, mesh)
        common.block(state)
        rec = remedy_ladder(cfg, root / f"remedies_{width}", state)
        out.append({"width": width, "state_mb": round(tree_bytes(state) / 1e6, 2),
                    **{f"{n}_blocking_s": common.summarize(v, 4) for n, v in rec.items()}})
    return out


@contextlib.contextmanager
def no_checksums():
    """Saves without their per-array checksums (for the throughput comparison only): the
    on-device snapshot still runs, the checksum reductions do not."""
    import jax
    import jax.numpy as jnp

    from distributed.checkpoint import deferred

    saved = deferred._checksums, deferred._snapshot
    deferred._checksums = lambda flat: {}
    deferred._snapshot = jax.jit(lambda flat: ({k: jnp.copy(v) for k, v in flat.items()}, {}))
    try:
        yield
    finally:
        deferred._checksums, deferred._snapshot = saved


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

    def train(every: int, checksums: bool = True) -> float:
        if not checksums:
            with no_checksums():
                return train(every)
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
    train(cfg.every, checksums=False)
    times = common.interleaved({"none": lambda: train(0), "every": lambda: train(cfg.every),
                                "every_no_checksums": lambda: train(cfg.every, False)},
                               cfg.runs)
    sps = {k: [train.steps / t for t in v] for k, v in times.items()}
    s = {k: common.summarize(v, 2) for k, v in sps.items()}
    ratio = s["every"]["median"] / s["none"]["median"]
    return {"job": f"the CLI's defaults with --model={cfg.model}, {e} epochs per phase",
            "steps": train.steps, "every": cfg.every,
            "saves_per_run": train.steps // cfg.every,
            "steps_per_s_none": s["none"], "steps_per_s_every": s["every"],
            "steps_per_s_every_no_checksums": s["every_no_checksums"],
            "throughput_ratio": round(ratio, 4),
            "checksums_ratio": round(s["every"]["median"] / s["every_no_checksums"]["median"],
                                     4),
            "paired_ratio": common.summarize(common.paired_ratios(times["none"],
                                                                  times["every"]), 4),
            "meets_target": bool(ratio >= cfg.throughput_target)}


def run(cfg: Config) -> dict:
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        sizes = blocking_vs_sync(cfg, root)
        ladder = remedies(cfg, root)
        tp = throughput(cfg, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    worst = max(s["blocking_over_sync"] for s in sizes[1:] or sizes)
    return {"sizes": sizes, "worst_blocking_over_sync": worst, "remedies": ladder,
            "throughput": tp, "blocking_target": cfg.blocking_target,
            "small_target_s": cfg.small_target_s, "throughput_target": cfg.throughput_target,
            "meets_target": bool(all(s["meets_target"] for s in sizes) and tp["meets_target"])}


if __name__ == "__main__":
    common.main("checkpoint", Config, QUICK, run)
