"""One training run from a `TrainConfig`: the wiring behind ``python -m distributed.train``.

Order of a run: read-only checks (runtime, workdir, mesh, data, batch size, the checkpoint to
resume from and whether its inputs still match) -> commit (lock, create the folder, write
``config.json``) -> train -> outputs. Any bad input is found before the commit and ends the run
with exit code 2 and one line; such a refused attempt changes nothing on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Any

import jax

from ..checkpoint import CheckpointError, CheckpointManager, CheckpointMismatch
from ..checkpoint.describe import describe
from ..core import bcd
from ..core.clock import EpochClock
from ..core.fingerprint import arrays_sha256, params_sha256
from ..core.mesh import check_batch_size, make_mesh
from ..core.step import StepOptions
from ..data import DataError
from ..engine import Engine, build
from ..loop import Checkpointer, RecoveryPolicy, TrainingDiverged, run_loop
from ..loop.profiling import Profile
from ..runtime import CoordinatorError, check_devices, exit_codes, initialize
from ..runtime.goodput import Ledger, read_previous_attempt
from ..runtime.signals import StopRequest
from ..runtime.watchdog import Watchdog
from . import ensemble, logs, outputs
from .config import TrainConfig, ensemble_size, from_dict, init_seed, profile_range, result_fields
from .tasks import RunTask, make_task
from .workdir import SetupError, Workdir, check_same_run, disk_full, write_json

log = logging.getLogger(__name__)


def step_options(cfg: TrainConfig) -> StepOptions:
    """The train step's options from the run config (clipping lives in the optimizer chain)."""
    return StepOptions(grad_accum=cfg.grad_accum, clip_norm=None,
                       compute_dtype=None if cfg.compute_dtype == "float32" else cfg.compute_dtype,
                       skip_nonfinite=cfg.skip_nonfinite, impl=cfg.step_impl)


def build_engine(cfg: TrainConfig, run_task: RunTask, mesh: Any, **kwargs: Any) -> Engine:
    """The engine of a command-line run (also what the benchmarks time); ``kwargs`` go to
    `distributed.engine.build` (e.g. ``with_data=False``, ``train_step=`` to reuse one)."""
    return build(run_task.task, mesh=mesh, batch_size=cfg.batch_size, seed=cfg.seed,
                 key=jax.random.key(init_seed(cfg)), options=step_options(cfg),
                 strategy=cfg.sharding, ensemble=ensemble.make_ensemble(cfg),
                 **{"device_data": cfg.device_data, **kwargs})


def _fingerprint(cfg: TrainConfig, run_task: RunTask) -> dict[str, Any]:
    task = run_task.task
    data = {"train": arrays_sha256(task.train)}
    if task.val is not None:
        data["val"] = arrays_sha256(task.val)
    return {"data": data, "config": result_fields(cfg)}


def _agree(error: SetupError | None) -> None:
    """Every process learns whether any failed its checks, so that all stop together."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    import numpy as np
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.array([int(error is not None)]))
    if error is not None:
        raise error
    bad = [i for i, f in enumerate(np.asarray(failed).reshape(-1)) if f]
    if bad:
        raise SetupError(f"process {bad[0]} could not start the run (see its error line).")


@dataclasses.dataclass
class _Run:
    cfg: TrainConfig
    ledger: Ledger
    stop: StopRequest
    wd: Workdir = None
    mesh: Any = None
    run_task: RunTask = None
    engine: Engine = None
    manager: CheckpointManager | None = None
    restored: dict | None = None
    writer: outputs.RunWriter | None = None
    status: str = "FAILED"  # how the run ended, for MLflow: FINISHED, KILLED (preempted)
    initial: dict = dataclasses.field(default_factory=dict)
    is_main: bool = True

    # -- read-only checks ---------------------------------------------------------------------
    def check(self) -> bool:
        """All read-only checks; returns False when the run is already complete."""
        cfg = self.cfg
        try:
            info = initialize(cfg.coordinator_address or None, cfg.num_processes or None,
                              cfg.process_id if cfg.process_id >= 0 else None,
                              timeout_s=cfg.init_timeout_s)
        except (ValueError, CoordinatorError) as e:
            raise SetupError(str(e)) from None
        logs.for_process(info.process_index)
        log.info(info.log_line())
        self.is_main = info.process_index == 0
        error = None
        try:
            self.wd = Workdir(cfg)
            self.wd.check()
            self.mesh = make_mesh(cfg.mesh)
            check_devices(self.mesh)
            ensemble.check_mesh(cfg, self.mesh)
        except (ValueError, RuntimeError) as e:
            error = e if isinstance(e, SetupError) else SetupError(f"--mesh={cfg.mesh}: {e}")
        except SetupError as e:
            error = e
        if error is None:
            error = self._check_task()
        _agree(error)
        log.info("mesh %s over %d devices", dict(self.mesh.shape), self.mesh.size)
        return not self._complete()

    def _check_task(self) -> SetupError | None:
        cfg = self.cfg
        missing = outputs.require_extras(cfg)
        if missing is None and cfg.mlflow_uri and self.is_main:
            missing = outputs.check_mlflow(cfg.mlflow_uri)
        if missing is not None:
            return SetupError(missing)
        try:
            self.run_task = make_task(cfg)
        except (DataError, ValueError) as e:
            return SetupError(str(e))
        try:
            check_batch_size(cfg.batch_size, self.mesh, jax.process_count(),
                             num_examples=self.run_task.task.num_train)
        except ValueError as e:
            return SetupError(f"--batch_size={cfg.batch_size}: {e}")
        return None

    def epochs_steps(self) -> int:
        """The steps of all the plan's epochs."""
        task = self.run_task.task
        return EpochClock(task.num_train, self.cfg.batch_size).steps(
            sum(p.epochs for p in task.plan))

    def target_step(self) -> int:
        total = self.epochs_steps()
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def _complete(self) -> bool:
        """A finished run (its summary at the target step): say so, touch nothing."""
        path = self.wd / "summary.json"
        if self.cfg.restart_from_scratch or not path.is_file():
            return False
        import json

        try:
            done = json.loads(path.read_text()).get("final_step")
        except (OSError, ValueError, AttributeError):
            return False
        if done != self.target_step():
            return False
        if self.cfg.max_steps and self.cfg.max_steps == done < self.epochs_steps():
            more = "Use a larger --max_steps to train on"
        else:  # it ran out of epochs: more epochs change the run's settings
            more = ("It trained all its epochs: to train on, give more epochs with --force "
                    "--allow_changed_inputs (it continues from its last checkpoint)")
        log.info("the run in %s is complete (step %d); nothing to do. %s, or use a new "
                 "--workdir.", self.wd.path, done, more)
        return True

    # -- build, restore, commit ---------------------------------------------------------------
    def prepare(self, watchdog: Watchdog) -> None:
        """Build the engine and restore the checkpoint to resume from (still read-only), then
        commit: lock, create the folder, write config.json."""
        cfg, wd = self.cfg, self.wd
        error = None
        try:
            if self.is_main and wd.path.exists():
                wd.lock()
            watchdog.beat("model and optimizer initialisation")
            self.engine = build_engine(cfg, self.run_task, self.mesh)
            self.initial = ensemble.split_report(outputs.test_report(
                self.run_task, self.engine, self.engine.state.model))[0]
            if not cfg.restart_from_scratch and wd.checkpoints.is_dir():
                watchdog.beat("checkpoint restore")
                self._restore()
        except SetupError as e:
            error = e
        except ValueError as e:
            error = SetupError(str(e))
        if error is not None:
            wd.unlock()
        _agree(error)
        if self.is_main:
            wd.create()
            wd.lock()
            if cfg.restart_from_scratch:
                wd.restart_from_scratch()
            write_json(wd / "config.json", cfg.to_dict())
            if self.restored is None or self.restored["step"] < self.target_step():
                (wd / "summary.json").unlink(missing_ok=True)  # a new attempt is under way
        _agree(None)
        logs.to_file(wd.path, jax.process_index())
        if self.manager is None:
            self.manager = self._manager()

    def _manager(self) -> CheckpointManager:
        try:
            return CheckpointManager(self.wd.checkpoints, max_to_keep=self.cfg.max_to_keep,
                                     async_save=self.cfg.async_checkpoint)
        except (OSError, ValueError) as e:
            raise SetupError(f"--workdir={self.cfg.workdir}: cannot use {self.wd.checkpoints} "
                             f"for checkpoints ({e}); choose another --workdir.") from None

    def _restore(self) -> None:
        cfg, wd = self.cfg, self.wd
        self.manager = self._manager()
        if self.manager.latest_step() is None:
            orphans = sorted(p.name for p in wd.checkpoints.iterdir() if p.name.isdigit())
            if orphans:  # step folders Orbax does not count as committed: never restart silently
                raise SetupError(
                    f"--workdir={cfg.workdir} has checkpoint folders {orphans} in "
                    f"{wd.checkpoints} but none is a complete checkpoint; pass "
                    f"--restart_from_scratch to start over (or restore a backup).")
            return
        ckpt = Checkpointer(self.manager, data_iterator=self.engine.data)
        try:
            with self.ledger.timer("restore"):
                state, step = ckpt.restore(self.engine.state)
        except CheckpointMismatch as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            raise SetupError(f"--workdir={cfg.workdir} holds checkpoints of another model or "
                             f"shape: {' '.join(lines[:2])[:400]} Use a new --workdir, or "
                             f"--restart_from_scratch to discard them.") from None
        except CheckpointError as e:
            raise SetupError(f"--workdir={cfg.workdir}: {e} Pass --restart_from_scratch to start "
                             f"over (it deletes these checkpoints).") from None
        self.restored = ckpt.restored
        self._check_inputs(self.restored["metadata"])
        self.engine.state = state
        meta = self.restored["metadata"]
        log.info("resumed from checkpoint step %d (phase %s, epoch %s, data position %s)",
                 step, meta.get("phase"), meta.get("epoch"), self.engine.data.get_state())

    def _check_inputs(self, meta: dict) -> None:
        """The data and settings of the checkpoint must be this run's (unless allowed)."""
        saved = meta.get("fingerprint") or {}
        now = _fingerprint(self.cfg, self.run_task)
        if self.cfg.allow_changed_inputs:
            return
        for split, sha in (saved.get("data") or {}).items():
            if now["data"].get(split) != sha:
                raise SetupError(
                    f"the {split} data differ from those the checkpoints in {self.wd.checkpoints}"
                    f" were trained on (--data={self.cfg.data or '(embedded)'}); use the same "
                    f"data, a new --workdir, or --allow_changed_inputs to resume anyway.")
        if saved.get("config"):
            try:
                old = from_dict({**self.cfg.to_dict(), **saved["config"]})
            except ValueError as e:
                raise SetupError(f"the settings saved with the checkpoints in "
                                 f"{self.wd.checkpoints} cannot be read ({e}); use a new "
                                 f"--workdir, or --allow_changed_inputs to resume them with "
                                 f"this run's settings.") from None
            check_same_run(old, self.cfg,
                           f"the checkpoints in {self.wd.checkpoints} were trained with other "
                           f"settings", fix="--allow_changed_inputs to resume them anyway, or "
                           "--restart_from_scratch to discard them")

    # -- train and report ---------------------------------------------------------------------
    def metadata(self, state, step: int, last: dict) -> dict:
        engine = self.engine
        p = bcd.phase_at(engine.plan, step, engine.clock)
        return {"schema": 1, "step": step, "epoch": engine.clock.epoch_of(step),
                "phase": engine.plan[p].name, "phase_index": p,
                "train_loss": last.get("train_loss"), "val_loss": last.get("val_loss"),
                "summary": {"final_train_loss": last.get("train_loss"),
                            "final_val_loss": last.get("val_loss"),
                            **ensemble.member_losses(last)},
                "fingerprint": self._fp, "config": self.cfg.to_dict(),
                **describe(state.model)}

    def train(self, watchdog: Watchdog) -> tuple[Any, Any]:
        cfg, engine = self.cfg, self.engine
        self._fp = _fingerprint(cfg, self.run_task)
        writer = self.writer = outputs.RunWriter(cfg, self.wd.path, engine.plan, engine.clock) \
            if self.is_main else None
        if self.restored is not None:
            self.ledger.previous = read_previous_attempt(self.wd / "metrics.jsonl") \
                if self.is_main else None
            self.ledger.note_resume(self.restored["step"])
            if writer is not None:
                writer.write(self.restored["step"],
                             {"event": "resume", **self.ledger.resume_record()})
        policy = None if not cfg.explosion_factor else RecoveryPolicy(
            explosion_factor=cfg.explosion_factor, max_retries=cfg.max_retries,
            lr_reduction=cfg.lr_reduction)
        ckpt = Checkpointer(self.manager, every_steps=cfg.checkpoint_every,
                            data_iterator=engine.data, metadata_fn=self.metadata)
        start, end = profile_range(cfg)
        callbacks = [Profile(self.wd / "tensorboard", start, end)] if end else []
        return run_loop(
            engine.state, engine.step_fn, data_iterator=engine.data,
            num_epochs=engine.total_epochs, clock=engine.clock, checkpointer=ckpt,
            evaluate=engine.evaluator, show_progress=cfg.progress, log_every=cfg.log_every,
            writer=writer, max_steps=cfg.max_steps, recovery=policy, stop=self.stop,
            ledger=self.ledger, watchdog=watchdog, callbacks=callbacks)

    def finish(self, state, result, t0: float) -> None:
        report, per_member = ensemble.split_report(
            outputs.test_report(self.run_task, self.engine, state.model))
        sha = params_sha256(state.model)
        members = None if self.engine.ensemble is None else ensemble.members_summary(
            self.cfg, state.model, result.history, per_member, self.restored)
        outputs.export(state.model, self.wd / "model.eqx", self.cfg, result,
                       None if members is None else ensemble.header(self.cfg))
        if not self.is_main:
            return
        summary = outputs.summary(
            result=result, sha=sha, wall_s=time.perf_counter() - t0,
            nonfinite=int(jax.device_get(state.nonfinite_count)), mesh=self.mesh,
            process_count=jax.process_count(), device_count=jax.device_count(), report=report,
            initial=self.initial, ledger=self.ledger, restored=self.restored)
        write_json(self.wd / "summary.json", {**summary, **(members or {})})
        self.writer.finish(summary, [self.wd / "model.eqx", self.wd / "summary.json"],
                           self.wd.path)
        skipped = f" ({summary['nonfinite_skipped']} updates skipped)" \
            if summary["nonfinite_skipped"] else ""
        log.info("done: step %d, train loss %s, val loss %s%s%s", result.final_step,
                 _fmt(summary["final_train_loss"]), _fmt(summary["final_val_loss"]),
                 "".join(f", {k} {v:.4g}" for k, v in report.items()), skipped)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.6g}"


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _train_and_report(r: _Run, watchdog: Watchdog, t0: float) -> int:
    """Train, close the checkpoints, write the outputs; the exit code."""
    try:
        try:
            state, result = r.train(watchdog)
        finally:
            watchdog.beat("closing the checkpoint manager")
            if r.manager is not None:
                r.manager.close()
        if result.stopped_by == "preempted":
            log.warning("preempted (%s): checkpoint at step %d committed; exiting with code %d",
                        r.stop.signal_name or "stop request", result.final_step,
                        exit_codes.PREEMPTED)
            r.status = "KILLED"
            return exit_codes.PREEMPTED
        watchdog.beat("final report")
        r.status = "FINISHED"
        r.finish(state, result, t0)
        return exit_codes.OK
    except TrainingDiverged as e:
        return _fail(str(e), 1)
    except SetupError as e:
        return _fail(str(e), exit_codes.USAGE)
    except Exception as e:
        full = disk_full(e, r.wd.path)
        if full is None:
            raise
        return _fail(full, 1)


def run(cfg: TrainConfig, stop: StopRequest | None = None) -> int:
    """Run training; returns the process exit code (`distributed.runtime.exit_codes`).

    ``stop`` (installed here if not yet): preemption signals from now on are remembered and end
    the run at the next step boundary with a committed checkpoint and exit code 42.
    """
    t0 = time.perf_counter()
    stop = (stop or StopRequest()).install()
    stop.keep_jax_away()  # else jax.distributed's preemption notifier takes SIGTERM from us
    ledger = Ledger(samples_per_step=cfg.batch_size * ensemble_size(cfg))
    r = _Run(cfg, ledger, stop)
    watchdog = None
    try:
        try:
            with ledger.timer("setup"):
                if not r.check():
                    return exit_codes.OK
                stop.ensure_installed()
                watchdog = Watchdog(cfg.watchdog_s, log_dir=r.wd.path if r.wd.path.exists()
                                    else None, process_index=jax.process_index()).start()
                r.prepare(watchdog)
        except SetupError as e:
            return _fail(str(e), exit_codes.USAGE)
        watchdog.log_dir = str(r.wd.path)
        return _train_and_report(r, watchdog, t0)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if r.writer is not None:
            r.writer.close(r.status)
        if r.wd is not None:
            r.wd.unlock()
        stop.uninstall()
        ledger.close()
