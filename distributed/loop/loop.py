"""`run_loop`: a plain loop over steps, epochs on an `EpochClock`, periodic actions by one rule.

The loop never waits for the device at each step: a step's metrics stay on the device until a
log point, a guard check or the epoch's end, and they are read only after the next step has been
dispatched (nanodo style), so the device always has queued work. Everything stateful the loop
owns (history, guards, timers) lives in this call's objects — no globals. `train_loop` is seed
002's API over it.
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

from ..core.clock import EpochClock
from ..core.losses import takes_argument
from ..runtime.goodput import Ledger
from ..runtime.signals import StopRequest
from .callbacks import Callback, CallbackList, Hook, StepInfo
from .checkpointing import Checkpointer
from .chunks import Chunk, chunk_end, mean_metrics, per_step, steps_per_call
from .periodic import itstime
from .progress import Progress
from .recovery import FiniteWatch, Guard, RecoveryPolicy, TrainingDiverged

log = logging.getLogger(__name__)

History = dict[str, list[float]]
_END = object()


@dataclasses.dataclass
class LoopResult:
    """What `run_loop` returns besides the state: history and bookkeeping for summaries."""

    history: History
    final_step: int
    resumed_from_step: int | None
    stopped_by: str | None  # None (finished), "max_steps", "callback", "preempted"
    last_metrics: dict[str, float]
    ledger: Ledger


def _state_counts(state: Any) -> tuple[int, int]:
    """``(step, nonfinite_count)`` of a `TrainState` (zeros for other states)."""
    got = jax.device_get((getattr(state, "step", 0), getattr(state, "nonfinite_count", 0)))
    return int(got[0]), int(got[1])


def run_loop(
    state: Any,
    train_step_fn: Callable,
    *,
    num_epochs: int,
    clock: EpochClock | None = None,
    num_batches: int | None = None,
    data_iterator: Iterator | None = None,
    data_iterator_fn: Callable[[], Iterable] | None = None,
    rng_key: jax.Array | None = None,
    checkpointer: Checkpointer | None = None,
    resume: bool = False,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    validate_every: int = 1,
    callbacks: Sequence[Callback] = (),
    hooks: Sequence[Hook] = (),
    writer: Any = None,
    log_every: int = 50,
    show_progress: bool | str = True,
    max_steps: int = 0,
    recovery: RecoveryPolicy | None = None,
    stop: StopRequest | None = None,
    ledger: Ledger | None = None,
    watchdog: Any = None,
    max_in_flight: int = 16,
) -> tuple[Any, LoopResult]:
    """The loop behind `train_loop`, `Trainer`, `general_train_cycle` and the command line.

    Args:
        state: the training state.
        train_step_fn: ``(state, batch, key) -> (state, metrics)``; when it takes a keyword
            ``step``, it also gets the number of steps done before this one.
        num_epochs: epochs to run in total (a resumed run continues to the same end).
        clock: where epochs end (`EpochClock(examples, batch size)`), or ``num_batches`` per
            epoch.
        data_iterator: one continuous, checkpointable iterator of batches (e.g. a
            `DevicePrefetcher`), or ``data_iterator_fn``: ``() -> batches of one epoch``.
        rng_key: step ``s`` gets ``fold_in(rng_key, s)`` (``None``: None).
        checkpointer: a `Checkpointer` (what to save when, and the data position).
        resume: restore the checkpointer's latest valid checkpoint first.
        evaluate: ``state -> {metric: float}`` (e.g. a `distributed.engine.Evaluator`), run
            every ``validate_every`` epochs, after the last one, and when ``max_steps`` stops.
        callbacks: `Callback` objects (``on_train_begin``, ``on_step_end``, ``on_epoch_end``
            returning True to stop, ``on_train_end``, ``final_state``).
        hooks: `Hook(fn, every=N)`: ``fn(StepInfo)`` every N steps, and once at the end.
        writer: a metrics writer (``write(step, dict)``): step records every ``log_every``
            steps (with the running goodput ledger), one record per epoch (``"event":
            "epoch"``: the epoch's mean train metrics and its validation), a resume record.
        log_every: steps between log lines / metric records.
        show_progress: `Progress` mode (``True``/``"auto"``, ``"bar"``, ``"log"``, ``False``).
        max_steps: stop once this many steps are done in total (0: no limit); checked before
            each step, so a run already there trains nothing more.
        recovery: loss-explosion policy (rollback, lower LR, retry).
        stop: a `StopRequest` (preemption signals); checked at every step boundary.
        ledger: a goodput `Ledger` to account time into (else a new one).
        watchdog: a `distributed.runtime.watchdog.Watchdog`, told what starts at every step
            boundary, data fetch, save, restore and validation.
        max_in_flight: dispatched steps allowed to run ahead of the host.

    Raises:
        TrainingDiverged: loss explosions beyond the policy's retries, or no finite update in a
            window of steps (after a final checkpoint).
    """
    if clock is None:
        if num_batches is None or num_batches < 1:
            raise ValueError(f"num_batches={num_batches!r} must be a positive integer (or give "
                             f"clock=EpochClock(...)).")
        clock = EpochClock(num_batches, 1)
    if (data_iterator_fn is None) == (data_iterator is None):
        raise ValueError("give exactly one of data_iterator_fn and data_iterator.")
    loop = _Loop(state, train_step_fn, num_epochs=num_epochs, clock=clock,
                 data_iterator=data_iterator, data_iterator_fn=data_iterator_fn,
                 rng_key=rng_key, checkpointer=checkpointer, evaluate=evaluate,
                 validate_every=validate_every, callbacks=callbacks, hooks=hooks, writer=writer,
                 log_every=log_every, max_steps=max_steps, recovery=recovery, stop=stop,
                 ledger=ledger, watchdog=watchdog, max_in_flight=max_in_flight)
    return loop.run(resume=resume, show_progress=show_progress)


class _Loop:
    """One call of `run_loop`: its state and bookkeeping, and the loop in small pieces."""

    def __init__(self, state, fn, *, num_epochs, clock, data_iterator, data_iterator_fn,
                 rng_key, checkpointer, evaluate, validate_every, callbacks, hooks, writer,
                 log_every, max_steps, recovery, stop, ledger, watchdog, max_in_flight):
        self.state, self.fn, self.clock = state, fn, clock
        self.num_epochs, self.total = num_epochs, clock.steps(num_epochs)
        self.data, self.data_fn, self.rng_key = data_iterator, data_iterator_fn, rng_key
        self.ckpt, self.evaluate, self.validate_every = checkpointer, evaluate, validate_every
        self.cbs, self.hooks, self.writer = CallbackList(callbacks), list(hooks), writer
        self.log_every, self.max_steps, self.stop = log_every, max_steps, stop
        self.owns_ledger = ledger is None
        self.ledger = ledger or Ledger()
        self.beat = watchdog.beat if watchdog is not None else (lambda what: None)
        self.guard = Guard(recovery, self.ledger) if recovery is not None else None
        self.max_in_flight = max_in_flight
        self.pass_step = takes_argument(fn, "step")
        self.history: History = {}
        self.last: dict[str, float] = {}
        self.stopped_by: str | None = None
        self.resumed_from: int | None = None
        self.in_flight: collections.deque = collections.deque()
        self.pending: tuple[int, dict | Chunk] | None = None
        self.per_call = steps_per_call(fn, data_iterator, recovery=self.guard is not None)

    # -- the whole run ------------------------------------------------------------------------
    def run(self, *, resume: bool, show_progress) -> tuple[Any, LoopResult]:
        if resume and self.ckpt is not None:
            self._restore()
        if self.ckpt is not None:
            self.ckpt.warm(self.state)
        self.step, self.count = _state_counts(self.state)
        self.watch = FiniteWatch(self.step, self.count)
        end = min(self.total, self.max_steps) if self.max_steps else self.total
        self.progress = Progress(show_progress, end, min(self.step, end))
        start_epoch = self.clock.epoch_of(self.step)
        self.cbs.on_train_begin(self.state, StepInfo(step=self.step, epoch=start_epoch))
        try:
            for epoch in range(start_epoch, self.num_epochs):
                metrics = self._epoch(epoch)
                if self.pending is not None:
                    self._handle(self.pending, force=True)
                    self.pending = None
                if not metrics or self.stopped_by == "preempted":
                    break  # preempted mid-epoch: no epoch-end work on a partial epoch
                self._end_epoch(epoch, metrics)
                if self.stopped_by is not None:
                    break
            self.watch.observe(self.step, self.count, final=True)
            self._commit()
        except TrainingDiverged:
            self._commit()
            raise
        finally:
            self.progress.close()
            if self.owns_ledger:
                self.ledger.close()
        return self._finish()

    def _restore(self) -> None:
        self.beat("checkpoint restore")
        with self.ledger.timer("restore"):
            self.state, self.resumed_from = self.ckpt.restore(self.state)
        if self.resumed_from is not None:
            self.ledger.note_resume(self.resumed_from)
            if self.writer is not None:
                self.writer.write(self.resumed_from,
                                  {"event": "resume", **self.ledger.resume_record()})

    def _batches(self, epoch: int) -> Iterator:
        start, end = self.clock.steps(epoch), self.clock.steps(epoch + 1)
        if self.data is not None:
            batches = itertools.islice(self.data, end - self.step)
        else:
            batches = itertools.islice(iter(self.data_fn()), self.step - start, end - start)
        return iter(self.ledger.timed_iter(batches, "data_wait"))

    # -- one epoch ----------------------------------------------------------------------------
    def _stopping(self) -> bool:
        """Whether to stop before the next step (checked before fetching: a fetched batch
        moves the saved data position)."""
        self.beat(f"stop check at step {self.step}")
        if self.stop is not None and self.stop.requested(self.step):
            self.stopped_by = "preempted"
        elif self.max_steps and self.step >= self.max_steps:
            self.stopped_by = "max_steps"
        return self.stopped_by is not None

    def _epoch(self, epoch: int) -> list[dict | Chunk]:
        if self.per_call > 1:
            return self._epoch_in_chunks(epoch)
        metrics: list[dict | Chunk] = []
        batches = self._batches(epoch)
        while self.step < self.clock.steps(epoch + 1):
            if self._stopping():
                break
            self.beat(f"data fetch for step {self.step + 1}")
            batch = next(batches, _END)
            if batch is _END:
                break
            metrics.append(self._dispatch(batch, epoch))
        return metrics

    def _epoch_in_chunks(self, epoch: int) -> list[dict | Chunk]:
        """`_epoch` with many steps per dispatch: chunks that end where host work is due."""
        chunks: list[dict | Chunk] = []
        limit = self.clock.steps(epoch + 1)
        if self.max_steps:
            limit = min(limit, self.max_steps)
        periods = [self.log_every, *(h.every for h in self.hooks)]
        if self.ckpt is not None:
            periods.append(self.ckpt.every_steps)
        if self.stop is not None and jax.process_count() > 1:
            periods.append(self.stop.sync_every)  # the steps where processes agree
        while self.step < self.clock.steps(epoch + 1):
            if self._stopping():
                break
            start = self.step
            end = chunk_end(start, limit, periods=periods, cap=self.per_call, boundaries=(
                1, self.fn.next_boundary(start), self.cbs.next_step_boundary(start)))
            self.beat(f"steps {start + 1}..{end}")
            with self.ledger.step_timer(start):
                self.state, metrics = self.fn.run_many(self.state, start, end - start)
            self.data.advance(end - start)
            self.step = end
            chunk = Chunk(start, end - start, metrics)
            self._after_dispatch(chunk, epoch)
            chunks.append(chunk)
        return chunks

    def _dispatch(self, batch: Any, epoch: int) -> dict:
        """Run one step, then do the host work of the step before it."""
        self.beat(f"step {self.step + 1}")
        key = None if self.rng_key is None else jax.random.fold_in(self.rng_key, self.step)
        kwargs = {"step": self.step} if self.pass_step else {}
        with self.ledger.step_timer(self.step):
            self.state, metrics = self.fn(self.state, batch, key, **kwargs)
        self.step += 1
        self._after_dispatch(metrics, epoch)
        return metrics

    def _after_dispatch(self, metrics: dict | Chunk, epoch: int) -> None:
        """The host work after dispatching a step (or a chunk of steps)."""
        # Bound the dispatch queue (XLA:CPU collectives can deadlock with thousands of queued
        # multi-device steps); waiting on a step max_in_flight back is free.
        leaves = jax.tree.leaves(metrics.metrics if isinstance(metrics, Chunk) else metrics)
        if leaves:
            self.in_flight.append(leaves[0])
            if len(self.in_flight) > self.max_in_flight:
                with self.ledger.timer("step"):  # waiting for the device to catch up
                    self.in_flight.popleft().block_until_ready()
        if self.guard is not None:
            self.guard.observe(self.step, self.state)
        if self.pending is not None:
            self._handle(self.pending)
        self.pending = (self.step, metrics)
        due = [h for h in self.hooks if itstime(self.step, h.every)]
        if self.cbs.callbacks or due:
            info = StepInfo(step=self.step, epoch=epoch, state=self.state,
                            metrics=metrics.last() if isinstance(metrics, Chunk) else metrics)
            self.cbs.on_step_end(self.step, info)
            for h in due:
                h.fn(info)
        if self.ckpt is not None and self.clock.epoch_ending_at(self.step) is None:
            # (a step that ends an epoch is saved after the epoch's metrics: see _end_epoch)
            self._save(self.ckpt.maybe_save, self.step, self.state, self.last)
        with self.ledger.timer("logging"):
            self.progress.update(self.step)

    def _handle(self, done: tuple[int, dict | Chunk], force: bool = False) -> None:
        """Host work for a finished step or chunk (called after the next was dispatched)."""
        s, metrics = done
        if isinstance(metrics, Chunk):
            with self.ledger.timer("step"):  # the chunk's results: waits for its steps
                rows = metrics.rows()
            for i, row in enumerate(rows):
                self._handle_step(metrics.start + i + 1, row, force and i == len(rows) - 1)
        else:
            self._handle_step(s, metrics, force)

    def _handle_step(self, s: int, metrics: dict, force: bool) -> None:
        at_log = itstime(s, self.log_every, first=True)
        if not (at_log or force or self.guard is not None):
            return
        with self.ledger.timer("step"):  # waits for the step
            host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        if "nonfinite_count" in host:
            self.count = int(host["nonfinite_count"])
            self.watch.observe(s, self.count)
        if self.guard is not None:
            self.state = self.guard.check(s, host, self.state)
        if at_log:
            with self.ledger.timer("logging"):
                host.update(self.ledger.rates(s))
                host["epoch"] = self.clock.epoch_of(s - 1)
                self.last = {**self.last, **host}
                if self.writer is not None:
                    self.writer.write(s, {**host, "goodput": self.ledger.snapshot()})
                self.progress.log(s, host)

    # -- epoch ends and the end ---------------------------------------------------------------
    def _end_epoch(self, epoch: int, metrics: list[dict | Chunk]) -> None:
        with self.ledger.timer("step"):  # waits for the epoch's last steps
            metrics = per_step(metrics)
            means = mean_metrics(metrics)
        for k, v in means.items():
            self.history.setdefault(f"train_{k}", []).append(v)
        record = {f"train_{k}": v for k, v in means.items()}
        self.last.update(record)
        last_epoch = epoch + 1 == self.num_epochs or self.stopped_by == "max_steps"
        validated = self.evaluate is not None and (
            itstime(epoch + 1, self.validate_every) or last_epoch)
        if validated:
            self.beat(f"validation after epoch {epoch}")
            with self.ledger.timer("validation"):
                val = {f"val_{k}": v for k, v in self.evaluate(self.state).items()}
            for k, v in val.items():
                self.history.setdefault(k, []).append(v)
            self.last.update(val)
            record.update(val)
        with self.ledger.timer("logging"):
            if self.writer is not None:
                self.writer.write(self.step, {"event": "epoch", "epoch": epoch,
                                              "steps": len(metrics), **record})
            self.progress.epoch(epoch, self.last, validated)
        if self.cbs.on_epoch_end(epoch, dict(self.last)):
            self.stopped_by = self.stopped_by or "callback"
        if self.stopped_by is None and self.ckpt is not None:
            self._save(self.ckpt.maybe_save, self.step, self.state, self.last, epoch_end=epoch)

    def _save(self, fn, *args, **kwargs) -> None:
        self.beat(f"checkpoint save at step {self.step}")
        with self.ledger.timer("checkpoint_blocking"):
            stats = fn(*args, **kwargs)
        if stats is not None:
            self.ledger.record_save(stats)

    def _commit(self) -> None:
        if self.ckpt is None:
            return
        self._save(self.ckpt.commit, self.step, self.state, self.last)
        self.beat(f"checkpoint commit at step {self.step}")

    def _finish(self) -> tuple[Any, LoopResult]:
        self.beat("end of training")
        state = self.cbs.final_state(self.state)
        for h in self.hooks:
            h.fn(StepInfo(step=self.step, epoch=self.clock.epoch_of(max(self.step - 1, 0)),
                          state=state, metrics=None, final=True))
        self.cbs.on_train_end(state, self.history)
        return state, LoopResult(self.history, self.step, self.resumed_from, self.stopped_by,
                                 self.last, self.ledger)
