"""`train_loop`: a plain for-loop over epochs and batches, with periodic hooks and callbacks.

The loop never waits for the device at each step: a step's metrics stay on the device until a
log point, a guard check or the epoch's end, and they are read only after the next step has been
dispatched (nanodo style), so the device always has queued work. Everything stateful the loop
owns (history, guards, timers) lives in this call's local objects — no globals.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from .callbacks import Callback, CallbackList, Hook, StepInfo
from .goodput import Ledger
from .recovery import Guard, RecoveryPolicy, TrainingDiverged
from .signals import StopRequest

log = logging.getLogger("distributed")

History = dict[str, list[float]]
_END = object()


def _mean_metrics(items: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-key mean of a list of metric dicts (device or host scalars), in one transfer."""
    if not items:
        return {}
    host = jax.device_get(list(items))
    keys = list(dict.fromkeys(k for m in host for k in m))
    out = {}
    for k in keys:
        vals = [float(np.asarray(m[k])) for m in host if k in m]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def _state_step(state: Any) -> int:
    step = getattr(state, "step", None)
    return 0 if step is None else int(jax.device_get(step))


@dataclasses.dataclass
class LoopResult:
    """What `run_loop` returns besides the state: history and bookkeeping for summaries."""

    history: History
    final_step: int
    resumed_from_step: int | None
    stopped_by: str | None  # None (finished), "max_steps", "callback", "preempted"
    last_metrics: dict[str, float]
    ledger: Ledger


def train_loop(
    state: Any,
    train_step_fn: Callable[[Any, Any, Any], tuple[Any, dict]],
    data_iterator_fn: Callable[[], Iterable] | None,
    num_epochs: int,
    num_batches: int,
    rng_key: jax.Array | None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    val_step_fn: Callable[[Any, Any, Any], tuple[Any, dict]] | None = None,
    val_data_iterator: Iterable | Callable[[], Iterable] | None = None,
    val_num_batches: int | None = None,
    show_progress: bool = True,
    **options: Any,
) -> tuple[Any, History]:
    """Train for ``num_epochs`` epochs of ``num_batches`` batches (seed 002's API).

    Args:
        state: the training state (any pytree; a `TrainState` has its ``step`` read on resume).
        train_step_fn: ``(state, batch, rng_key) -> (new_state, metrics_dict)``; metrics are
            device scalars, read by the loop only at log points and epoch ends.
        data_iterator_fn: ``() -> iterator of batches`` for one epoch (called once per epoch).
        num_epochs: epochs to run.
        num_batches: batches per epoch.
        rng_key: base PRNG key; step ``s`` gets ``fold_in(rng_key, s)`` (``None``: pass None).
        checkpoint_dir: save asynchronous Orbax checkpoints here (``None``: no checkpoints).
        checkpoint_every: save every this many epochs.
        val_step_fn: ``(state, batch, rng_key) -> (state, metrics_dict)``.
        val_data_iterator: validation batches: an iterable (materialised once and reused each
            epoch) or a zero-argument callable returning a fresh iterator.
        val_num_batches: validation batches per evaluation (default: all).
        show_progress: a tqdm bar on a TTY, periodic log lines otherwise.
        **options: see `run_loop` (callbacks, hooks, data_iterator, checkpoint_manager, ...).

    Returns:
        ``(final_state, history)``: history maps ``train_<metric>`` / ``val_<metric>`` to
        per-epoch lists.
    """
    state, result = run_loop(
        state,
        train_step_fn,
        data_iterator_fn=data_iterator_fn,
        num_epochs=num_epochs,
        num_batches=num_batches,
        rng_key=rng_key,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        val_step_fn=val_step_fn,
        val_data_iterator=val_data_iterator,
        val_num_batches=val_num_batches,
        show_progress=show_progress,
        **options,
    )
    return state, result.history


def run_loop(
    state: Any,
    train_step_fn: Callable,
    *,
    data_iterator_fn: Callable[[], Iterable] | None = None,
    data_iterator: Iterator | None = None,
    num_epochs: int,
    num_batches: int,
    rng_key: jax.Array | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    checkpoint_every_steps: int = 0,
    checkpoint_manager: Any = None,
    metadata_fn: Callable[[Any, int, dict], dict] | None = None,
    resume: bool = False,
    val_step_fn: Callable | None = None,
    val_data_iterator: Iterable | Callable[[], Iterable] | None = None,
    val_num_batches: int | None = None,
    validate_every: int = 1,
    show_progress: bool = True,
    callbacks: Sequence[Callback] = (),
    hooks: Sequence[Hook] = (),
    log_every: int = 50,
    writer: Any = None,
    max_steps: int = 0,
    recovery: RecoveryPolicy | None = None,
    stop: StopRequest | None = None,
    ledger: Ledger | None = None,
    epoch_of_step: Callable[[int], int] | None = None,
    watchdog: Any = None,
    max_in_flight: int = 16,
) -> tuple[Any, LoopResult]:
    """The loop behind `train_loop`, `Trainer` and the command line.

    Beyond `train_loop`'s arguments:
        data_iterator: one continuous, checkpointable iterator (e.g. a `DevicePrefetcher`)
            instead of ``data_iterator_fn``; each epoch takes ``num_batches`` batches from it
            and its position is saved with each checkpoint and restored on resume.
        checkpoint_every_steps: also save every N steps.
        checkpoint_manager: a `distributed.checkpoint.CheckpointManager` to use (else one is
            made for ``checkpoint_dir``).
        metadata_fn: ``(state, step, last_metrics) -> dict`` JSON metadata saved with each step.
        resume: restore the latest valid checkpoint (state and data position) before training.
        callbacks: `Callback` objects (``on_train_begin``, ``on_epoch_end`` returning True to
            stop, ``on_step_end``, ``on_train_end``).
        hooks: `Hook(fn, every=N)`: ``fn(StepInfo)`` every N steps, and once at the end.
        log_every: steps between log lines / metric writes.
        writer: a metrics writer (``write(step, dict)``), e.g. `JsonlWriter`.
        max_steps: stop after this many steps in total (0: no limit).
        recovery: loss-explosion policy (rollback, lower LR, retry).
        stop: a `StopRequest` (preemption signals); checked at every step boundary.
        ledger: a goodput `Ledger` to account time into (else a new one). Its running totals
            go into every record given to ``writer`` (``goodput``), and a resume writes one
            ``{"event": "resume", ...}`` record with the work lost since the last checkpoint.
        epoch_of_step: maps a global step to the epoch reported in logs (default step // nb).
        max_in_flight: dispatched steps allowed to run ahead of the host.
        watchdog: a `distributed.watchdog.Watchdog`, told at every step boundary, data fetch,
            save, restore and validation what starts (a stall there ends the process).
    """
    if num_batches is None or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be a positive integer.")
    if (data_iterator_fn is None) == (data_iterator is None):
        raise ValueError("give exactly one of data_iterator_fn and data_iterator.")
    owns_ledger = ledger is None
    ledger = ledger or Ledger()
    cbs = CallbackList(callbacks)
    history: History = {}
    manager = checkpoint_manager
    owns_manager = False
    if manager is None and checkpoint_dir is not None:
        from .checkpoint import CheckpointManager

        manager, owns_manager = CheckpointManager(checkpoint_dir), True

    beat = watchdog.beat if watchdog is not None else (lambda what: None)
    resumed_from = None
    if resume and manager is not None and manager.latest_step() is not None:
        beat("checkpoint restore")
        with ledger.timer("restore"):
            state, _, resumed_from = manager.restore(
                _abstract_like(state), data_iterator=data_iterator
            )
    step = _state_step(state)
    if resumed_from is not None:
        ledger.note_resume(resumed_from)
        if writer is not None:
            writer.write(resumed_from, {"event": "resume", **ledger.resume_record()})
    guard = Guard(recovery, ledger) if recovery is not None else None
    progress = _progress(show_progress, num_epochs * num_batches, step)
    val_cache: list | None = None
    stopped_by = None
    last: dict[str, float] = {}
    pending: tuple[int, dict] | None = None
    in_flight: collections.deque = collections.deque()
    start_epoch = step // num_batches

    saved_at = {"step": manager.latest_step() if manager is not None else None}

    def save(force: bool = False):
        if manager is None or saved_at["step"] == step:
            return
        saved_at["step"] = step
        meta = metadata_fn(state, step, last) if metadata_fn else None
        beat(f"checkpoint save at step {step}")
        with ledger.timer("checkpoint_blocking"):
            started = manager.save(
                step, state, data_iterator=data_iterator, metadata=meta,
                metrics={k: v for k, v in last.items() if k.startswith("val_")} or None,
                force=force)
        if started and getattr(manager, "last_save", None) is not None:
            ledger.record_save(manager.last_save)

    def handle(done: tuple[int, dict]):
        """Host work for a finished step (called after the next step was dispatched)."""
        nonlocal state, last
        s, metrics = done
        read = guard is not None or s % log_every == 0 or s == 1
        if not read:
            return
        host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        if guard is not None:
            state = guard.check(s, host, state)
        if s % log_every == 0 or s == 1:
            host.update(ledger.rates(s))
            host["epoch"] = (epoch_of_step or (lambda x: (x - 1) // num_batches))(s)
            last = {**last, **host}
            if writer is not None:
                writer.write(s, {**host, "goodput": ledger.snapshot()})
            progress.log(s, host)

    cbs.on_train_begin(state, StepInfo(step=step, epoch=start_epoch))
    try:
        for epoch in range(start_epoch, num_epochs):
            epoch_metrics: list[dict] = []
            skip = step - epoch * num_batches  # > 0 only when resuming mid-epoch
            if data_iterator is not None:
                batches = itertools.islice(data_iterator, num_batches - skip)
            else:
                batches = itertools.islice(iter(data_iterator_fn()), skip, num_batches)
            batches = iter(ledger.timed_iter(batches, "data_wait"))
            while True:
                # Check before fetching: a fetched batch moves the saved data position.
                beat(f"stop check at step {step}")
                if stop is not None and stop.requested(step):
                    stopped_by = "preempted"
                    break
                beat(f"data fetch for step {step + 1}")
                batch = next(batches, _END)
                if batch is _END:
                    break
                beat(f"step {step + 1}")
                key = None if rng_key is None else jax.random.fold_in(rng_key, step)
                with ledger.step_timer(step):
                    state, metrics = train_step_fn(state, batch, key)
                step += 1
                epoch_metrics.append(metrics)
                # Bound the dispatch queue (XLA:CPU collectives can deadlock with thousands of
                # queued multi-device steps); waiting on a step max_in_flight back is free.
                leaves = jax.tree.leaves(metrics)
                if leaves:
                    in_flight.append(leaves[0])
                    if len(in_flight) > max_in_flight:
                        in_flight.popleft().block_until_ready()
                if guard is not None:
                    guard.observe(step, state)
                if pending is not None:
                    handle(pending)
                pending = (step, metrics)
                info = StepInfo(step=step, epoch=epoch, state=state, metrics=metrics)
                cbs.on_step_end(step, info)
                for h in hooks:
                    if step % h.every == 0:
                        h.fn(info)
                if checkpoint_every_steps and step % checkpoint_every_steps == 0:
                    save()
                progress.update(step)
                if max_steps and step >= max_steps:
                    stopped_by = "max_steps"
                    break
            if pending is not None:
                handle(pending)
                pending = None
            if not epoch_metrics or stopped_by == "preempted":
                break  # preempted mid-epoch: no epoch-end work on a partial epoch
            epoch_host = _mean_metrics(epoch_metrics)
            for k, v in epoch_host.items():
                history.setdefault(f"train_{k}", []).append(v)
            last.update({f"train_{k}": v for k, v in epoch_host.items()})
            if val_step_fn is not None and (epoch + 1) % validate_every == 0:
                beat(f"validation after epoch {epoch}")
                with ledger.timer("validation"):
                    val_cache, val = _validate(state, val_step_fn, val_data_iterator,
                                               val_num_batches, val_cache, rng_key)
                for k, v in val.items():
                    history.setdefault(f"val_{k}", []).append(v)
                last.update({f"val_{k}": v for k, v in val.items()})
                if writer is not None:
                    writer.write(step, {f"val_{k}": v for k, v in val.items()} | {"epoch": epoch})
            progress.epoch(epoch, last)
            if cbs.on_epoch_end(epoch, dict(last)):
                stopped_by = stopped_by or "callback"
            if stopped_by is None and checkpoint_dir is not None and checkpoint_every and (
                (epoch + 1) % checkpoint_every == 0
            ):
                save()
            if stopped_by is not None:
                break
        if manager is not None:
            save(force=True)
            beat(f"checkpoint commit at step {step}")
            with ledger.timer("checkpoint_blocking"):
                manager.wait()
        beat("end of training")
    except TrainingDiverged:
        if manager is not None:
            save(force=True)
            manager.wait()
        raise
    finally:
        progress.close()
        if owns_manager:
            manager.close()
        if owns_ledger:
            ledger.close()
    state = cbs.final_state(state)
    for h in hooks:
        h.fn(StepInfo(step=step, epoch=step // num_batches, state=state, metrics=None,
                      final=True))
    cbs.on_train_end(state, history)
    return state, LoopResult(history, step, resumed_from, stopped_by, last, ledger)


def _validate(state, val_step_fn, source, num, cache, rng_key):
    if callable(source) and not hasattr(source, "__next__"):
        batches = iter(source())
    else:
        if cache is None:
            cache = list(itertools.islice(source, num) if num else source)
        batches = iter(cache)
    if num:
        batches = itertools.islice(batches, num)
    results = []
    for i, batch in enumerate(batches):
        key = None if rng_key is None else jax.random.fold_in(rng_key, 2**32 - 1 - i)
        _, m = val_step_fn(state, batch, key)
        results.append(m)
    return cache, _mean_metrics(results)


def _abstract_like(state: Any) -> Any:
    """Abstract target for restore: each array's shape, dtype and CURRENT sharding."""

    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(one, state)


class _Progress:
    """tqdm bar on a TTY; periodic log lines otherwise (e.g. under SLURM)."""

    def __init__(self, mode: str, total: int, initial: int):
        self.bar = None
        self.mode = mode
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, host: dict):
        if self.mode == "none":
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in host.items()
                        if k in ("loss", "grad_norm", "samples_per_sec") or k.startswith("lr"))
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.mode == "log":
            log.info("step %d %s", step, text)

    def epoch(self, epoch: int, last: dict):
        if self.mode == "log":
            vals = " ".join(f"{k}={v:.4g}" for k, v in last.items()
                            if k.startswith(("train_loss", "val_")))
            log.info("epoch %d %s", epoch, vals)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _progress(show: bool | str, total: int, initial: int) -> _Progress:
    import sys

    if show is False or show == "none":
        return _Progress("none", total, initial)
    if show in ("bar", "log"):
        return _Progress(show, total, initial)
    return _Progress("bar" if sys.stdout.isatty() else "log", total, initial)
