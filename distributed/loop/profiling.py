"""`Profile`: a `jax.profiler` trace of a range of steps, as a loop callback."""

from __future__ import annotations

import logging
import os

import jax

from .callbacks import Callback, StepInfo

log = logging.getLogger(__name__)


class Profile(Callback):
    """Trace steps ``start..end`` (1-based, inclusive) with `jax.profiler` into ``logdir``.

    The trace lands where TensorBoard's profile plugin looks:
    ``<logdir>/plugins/profile/<run>/*.xplane.pb`` (open ``tensorboard --logdir <logdir>``).
    The trace starts before step ``start`` is dispatched and stops once step ``end`` has
    finished on the device.
    """

    def __init__(self, logdir: str | os.PathLike, start: int, end: int):
        if not 0 < start <= end:
            raise ValueError(f"profile steps {start}:{end}: need 0 < start <= end.")
        self.logdir, self.start, self.end = os.fspath(logdir), start, end
        self.active = False

    def _begin(self, at: int) -> None:
        jax.profiler.start_trace(self.logdir)
        self.active = True
        log.info("profiling steps %d..%d into %s", at, self.end, self.logdir)

    def _finish(self, state) -> None:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        log.info("profile written to %s/plugins/profile", self.logdir)

    def on_train_begin(self, state, info: StepInfo) -> None:
        if info.step < self.start <= info.step + 1:
            self._begin(info.step + 1)

    def next_step_boundary(self, step: int) -> int | None:
        return next((b for b in (self.start - 1, self.end) if b > step), None)

    def on_step_end(self, step: int, info: StepInfo) -> None:
        if not self.active and step == self.start - 1:
            self._begin(self.start)
        elif self.active and step >= self.end:
            self._finish(info.state)

    def on_train_end(self, state, history) -> None:
        if self.active:  # the run ended inside the range
            self._finish(state)
