"""One training run from a `TrainConfig`: the wiring behind ``python -m distributed.train``.

Setup (config, runtime, mesh, data, checkpoints) runs first; any bad input found there ends the
run with exit code 2 and one line, before anything that looks like a result is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax

from . import bcd
from .config import TrainConfig, from_dict, result_fields
from .signals import PREEMPTED_EXIT_CODE, StopRequest

log = logging.getLogger("distributed")
USAGE = 2


class SetupError(Exception):
    """Bad input found before training: reported as one line with exit code 2."""


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_workdir(cfg: TrainConfig, is_main: bool) -> Path:
    # Resolved once (symlinks and `..` as the OS sees them): every output goes inside it.
    workdir = Path(cfg.workdir).expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise SetupError(f"--workdir={cfg.workdir} exists and is not a folder; choose another.")
    cfg_path = workdir / "config.json"
    if cfg_path.exists() and not cfg.force and not cfg.restart_from_scratch:
        try:
            old = from_dict(json.loads(cfg_path.read_text()))
        except (ValueError, TypeError) as e:
            raise SetupError(f"{cfg_path} is not a valid config ({e}); use another --workdir or "
                             f"pass --force to overwrite it.") from None
        diff = {k: (v, result_fields(cfg)[k]) for k, v in result_fields(old).items()
                if result_fields(cfg).get(k) != v}
        if diff:
            k, (was, now) = next(iter(diff.items()))
            raise SetupError(
                f"--workdir={cfg.workdir} holds a different run (--{k} was {was!r}, now "
                f"{now!r}{' and more' if len(diff) > 1 else ''}); use a new --workdir, or "
                f"--force to reuse it."
            )
    return workdir


def run(cfg: TrainConfig, stop: StopRequest | None = None) -> int:
    """Run training; returns the process exit code.

    ``stop`` (installed here if not yet): preemption signals from now on are remembered and end
    the run at the next step boundary with a committed checkpoint and `PREEMPTED_EXIT_CODE`.
    """
    from .goodput import Ledger
    from .watchdog import Watchdog

    stop = (stop or StopRequest()).install()
    stop.keep_jax_away()  # else jax.distributed's preemption notifier takes SIGTERM from us
    ledger = Ledger(samples_per_step=cfg.batch_size)
    try:
        try:
            with ledger.timer("setup"):
                setup = _setup(cfg)
        except SetupError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return USAGE
        ledger.previous = setup.get("previous")
        stop.ensure_installed()
        watchdog = Watchdog(cfg.watchdog_s, log_dir=setup["workdir"],
                            process_index=jax.process_index()).start()
        try:
            return _train(cfg, dict(setup, stop=stop, ledger=ledger, watchdog=watchdog))
        finally:
            watchdog.stop()
    finally:
        stop.uninstall()
        ledger.close()


def _setup(cfg: TrainConfig) -> dict[str, Any]:
    from .checkpoint import CheckpointManager
    from .data import DataError, check_batch_size
    from .mesh import make_mesh
    from .runtime import CoordinatorError, check_devices, initialize
    from .tasks import make_task

    try:
        info = initialize(cfg.coordinator_address or None, cfg.num_processes or None,
                          cfg.process_id if cfg.process_id >= 0 else None,
                          timeout_s=cfg.init_timeout_s)
    except (ValueError, CoordinatorError) as e:
        raise SetupError(str(e)) from None
    log.info(info.log_line())
    is_main = info.process_index == 0
    workdir = _check_workdir(cfg, is_main)
    try:
        mesh = make_mesh(cfg.mesh)
        check_devices(mesh)
    except (ValueError, RuntimeError) as e:
        raise SetupError(f"--mesh={cfg.mesh}: {e}") from None
    log.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    try:
        task = make_task(cfg)
    except (DataError, ValueError) as e:
        raise SetupError(str(e)) from None
    n_train = len(next(iter(task.train.values())))
    try:
        check_batch_size(cfg.batch_size, num_examples=n_train,
                         process_count=jax.process_count(), mesh=mesh)
    except (DataError, ValueError) as e:
        raise SetupError(f"--batch_size={cfg.batch_size}: {e}") from None
    from .goodput import read_previous_attempt
    from .watchdog import stall_point

    try:
        stall = stall_point()
    except ValueError as e:
        raise SetupError(str(e)) from None
    ckpt_dir = workdir / "checkpoints"
    if cfg.restart_from_scratch and is_main and ckpt_dir.exists():
        _check_only_steps(ckpt_dir)
        shutil.rmtree(ckpt_dir)
    _sync("restart")
    if is_main:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SetupError(f"--workdir={cfg.workdir} cannot be created ({e.strerror}); "
                             f"choose a writable folder.") from None
    _sync("workdir")
    try:
        manager = CheckpointManager(ckpt_dir, max_to_keep=cfg.max_to_keep,
                                    async_save=cfg.async_checkpoint)
    except (OSError, ValueError) as e:
        raise SetupError(f"--workdir={cfg.workdir}: cannot use {ckpt_dir} for checkpoints "
                         f"({e}); choose another --workdir.") from None
    resume = manager.latest_step() is not None
    if not resume and not cfg.restart_from_scratch:
        orphans = sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) \
            if ckpt_dir.is_dir() else []
        if orphans:  # step folders Orbax does not count as committed: never start over silently
            manager.close()
            raise SetupError(
                f"--workdir={cfg.workdir} has checkpoint folders {orphans} in {ckpt_dir} but "
                f"none is a complete checkpoint; pass --restart_from_scratch to start over "
                f"(or restore a backup).")
    previous = read_previous_attempt(workdir / "metrics.jsonl") if resume and is_main else None
    if is_main:
        _atomic_write_json(workdir / "config.json", cfg.to_dict())
        # summary.json describes a finished attempt; this one has not finished yet.
        (workdir / "summary.json").unlink(missing_ok=True)
    return dict(info=info, mesh=mesh, task=task, manager=manager, resume=resume,
                workdir=workdir, is_main=is_main, n_train=n_train, previous=previous,
                stall=stall)


def _check_only_steps(ckpt_dir: Path) -> None:
    """Refuse to delete a checkpoints/ folder holding anything but checkpoint steps."""
    foreign = sorted(p.name for p in ckpt_dir.iterdir()
                     if not (p.is_dir() and p.name.split(".")[0].isdigit()))
    if foreign:
        raise SetupError(
            f"--restart_from_scratch would delete {ckpt_dir}, which holds files that are not "
            f"checkpoint steps ({', '.join(foreign[:3])}); move them away or use another "
            f"--workdir.")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _train(cfg: TrainConfig, s: dict[str, Any]) -> int:
    from .checkpoint import CheckpointError, _Mismatch
    from .cycle import PhaseStepFn
    from .data import DevicePrefetcher, make_dataset, steps_per_epoch
    from .fingerprint import params_sha256
    from .loop import run_loop
    from .recovery import RecoveryPolicy, TrainingDiverged
    from .state import init_state
    from .step import TrainStep, make_eval_step
    from .watchdog import StallingIterator, maybe_stall

    t0 = time.perf_counter()
    mesh, task, manager, workdir = s["mesh"], s["task"], s["manager"], s["workdir"]
    ledger, stop, stall, watchdog = s["ledger"], s["stop"], s["stall"], s["watchdog"]
    watchdog.beat("model and optimizer initialisation")
    state, shardings = init_state(task.model_fn, task.optimizers, task.blocks_fn,
                                  key=jax.random.key(cfg.seed), mesh=mesh, strategy=cfg.sharding)
    blocks = task.blocks_fn(state.model)
    step = TrainStep(task.loss_fn, task.optimizers, blocks, mesh=mesh,
                     state_shardings=shardings, options=step_options(cfg))
    evaluate = make_eval_step(task.eval_fn, mesh=mesh, model_shardings=shardings.model)
    initial_report = task.report_fn(state.model)

    spe = steps_per_epoch(s["n_train"], cfg.batch_size)
    plan = task.plan
    total_epochs = sum(p.epochs for p in plan)
    ds = make_dataset(task.train, global_batch_size=cfg.batch_size, seed=cfg.seed,
                      num_epochs=None)
    host_it = iter(ds)
    if stall is not None and stall[0] == "data":  # test hook, see distributed/watchdog.py
        host_it = StallingIterator(host_it, stall[1])
    data_it = DevicePrefetcher(host_it, mesh, size=2)
    val_ds = make_dataset(task.val, global_batch_size=min(cfg.batch_size, _val_batch(task, cfg)),
                          seed=cfg.seed, shuffle=False, num_epochs=1)
    val_batches = lambda: DevicePrefetcher(iter(val_ds), mesh, size=2)
    # The CLI's L1 schedule counts epochs from the start of the run, not of each phase.
    first_epoch = [b // spe for b in bcd.phase_boundaries(plan, spe)]
    phase_fn = PhaseStepFn(step, plan, spe, shardings.model, mesh,
                           extras=lambda p, e: task.batch_extras(first_epoch[p] + e))

    def train_step_fn(state, batch, key):
        if stall is not None:  # test hook, see distributed/watchdog.py
            done = phase_fn.host_step
            maybe_stall("step", (int(jax.device_get(state.step)) if done is None else done) + 1,
                        stall)
        return phase_fn(state, batch, key)

    def val_step_fn(state, batch, key):
        return state, evaluate(state.model, batch)

    def metadata_fn(state, at_step, last):
        p = bcd.phase_at(plan, at_step, spe)
        return {"schema": 1, "step": at_step, "epoch": at_step // spe, "phase": plan[p].name,
                "phase_index": p, "train_loss": last.get("train_loss"),
                "val_loss": last.get("val_loss"), "config": cfg.to_dict(),
                "arch": _arch(state.model)}

    writer = _PhaseWriter(_writers(cfg, workdir), plan, spe) \
        if s["is_main"] else None
    if stall is not None and stall[0] == "save":  # test hook, see distributed/watchdog.py
        save_fn = manager.save
        manager.save = lambda at, *a, **k: (maybe_stall("save", at, stall), save_fn(at, *a, **k))[1]
    policy = None
    if cfg.explosion_factor:
        policy = RecoveryPolicy(explosion_factor=cfg.explosion_factor,
                                max_retries=cfg.max_retries, lr_reduction=cfg.lr_reduction)
    max_steps = cfg.max_steps
    code = 0
    try:
        state, result = run_loop(
            state, train_step_fn, data_iterator=data_it, num_epochs=total_epochs,
            num_batches=spe, checkpoint_manager=manager, checkpoint_every=0,
            checkpoint_every_steps=cfg.checkpoint_every, metadata_fn=metadata_fn,
            resume=s["resume"], val_step_fn=val_step_fn, val_data_iterator=val_batches,
            show_progress=cfg.progress, log_every=cfg.log_every, writer=writer,
            max_steps=max_steps, recovery=policy, stop=stop, ledger=ledger, watchdog=watchdog,
        )
    except CheckpointError as e:
        if writer:
            writer.close()
        print(f"error: --workdir={cfg.workdir}: {e} Pass --restart_from_scratch to start over "
              f"(it deletes these checkpoints).", file=sys.stderr, flush=True)
        return USAGE
    except _Mismatch as e:
        if writer:
            writer.close()
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        print(f"error: --workdir={cfg.workdir} holds checkpoints of another model or shape: "
              f"{' '.join(lines[:2])[:400]} Use a new --workdir, or --restart_from_scratch to "
              f"discard them.", file=sys.stderr, flush=True)
        return USAGE
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        watchdog.beat("closing the checkpoint manager")
        manager.close()
    if writer:
        writer.close()
    if result.stopped_by == "preempted":
        log.warning("preempted (%s): checkpoint at step %d committed; exiting with code %d",
                    stop.signal_name or "stop request", result.final_step, PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    watchdog.beat("final report")
    report = task.report_fn(state.model)
    sha = params_sha256(state.model)
    if s["is_main"]:
        hist = result.history
        summary = {
            "final_step": result.final_step,
            "final_train_loss": hist.get("train_loss", [None])[-1],
            "final_val_loss": hist.get("val_loss", [None])[-1],
            "params_sha256": sha,
            "resumed_from_step": result.resumed_from_step,
            "stopped_by": result.stopped_by,
            "samples_per_sec": result.last_metrics.get("samples_per_sec"),
            "wall_s": round(time.perf_counter() - t0, 3),
            "nonfinite_skipped": int(jax.device_get(state.nonfinite_count)),
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "mesh": dict(mesh.shape),
            **report,
            **{f"initial_{k}": v for k, v in initial_report.items()},
            "goodput": ledger.summary(),
        }
        _atomic_write_json(workdir / "summary.json", summary)
        log.info("done: step %d, train loss %s, val loss %s%s", result.final_step,
                 summary["final_train_loss"], summary["final_val_loss"],
                 "".join(f", {k} {v:.4g}" for k, v in report.items()))
    return code


def step_options(cfg: TrainConfig):
    """The train step's options from the run config (clipping lives in the optimizer chain)."""
    from .step import StepOptions

    return StepOptions(grad_accum=cfg.grad_accum, clip_norm=None, has_aux=True,
                       compute_dtype=None if cfg.compute_dtype == "float32"
                       else cfg.compute_dtype, skip_nonfinite=cfg.skip_nonfinite,
                       impl=cfg.step_impl)


def _writers(cfg: TrainConfig, workdir: Path):
    """metrics.jsonl, plus TensorBoard event files in ``workdir/tensorboard`` if asked for."""
    from .metrics import JsonlWriter, MultiWriter, TensorBoardWriter

    jsonl = JsonlWriter(workdir / "metrics.jsonl")
    if not cfg.tensorboard:
        return jsonl
    return MultiWriter([jsonl, TensorBoardWriter(workdir / "tensorboard")])


def _val_batch(task, cfg) -> int:
    n = len(next(iter(task.val.values())))
    shards = jax.device_count()
    return max(shards, (n // shards) * shards) if n >= shards else shards


def _arch(model) -> dict | None:
    fn = getattr(model, "arch", None)
    return fn() if callable(fn) else None


class _PhaseWriter:
    """Adds the BCD phase name and a single ``lr`` to every metrics.jsonl record."""

    def __init__(self, writer, plan, spe):
        self.writer, self.plan, self.spe = writer, plan, spe

    def write(self, step: int, metrics: dict) -> None:
        p = bcd.phase_at(self.plan, max(step - 1, 0), self.spe)
        rec = {"phase": self.plan[p].name, **metrics}
        lrs = [v for k, v in metrics.items() if k.startswith("lr_")]
        if lrs and "lr" not in rec:
            rec["lr"] = lrs[0]
        self.writer.write(step, rec)

    def close(self) -> None:
        self.writer.close()
