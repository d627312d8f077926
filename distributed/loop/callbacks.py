"""Callbacks and periodic hooks for `train_loop`, and early stopping that restores the best."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from ..core.tree import tree_copy

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StepInfo:
    """What a hook or callback sees: ``metrics`` are device scalars (reading them syncs)."""

    step: int
    epoch: int
    state: Any = None
    metrics: dict | None = None
    final: bool = False


@dataclasses.dataclass(frozen=True)
class Hook:
    """Run ``fn(StepInfo)`` every ``every`` steps (and once at the end, with ``final=True``)."""

    fn: Callable[[StepInfo], None]
    every: int = 1

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Hook every={self.every} must be >= 1.")


class Callback:
    """Base class: override the hooks you need (seed 003's ``BaseCallback``)."""

    def on_train_begin(self, state: Any, info: StepInfo) -> None:
        pass

    def on_step_end(self, step: int, info: StepInfo) -> None:
        pass

    def next_step_boundary(self, step: int) -> int | None:
        """With many steps per dispatch (device-resident input), `on_step_end` runs once per
        dispatch, at its end: the first step count after ``step`` at which this callback must
        see the state. Default: every step if `on_step_end` is overridden, else ``None`` (no
        constraint)."""
        return None if type(self).on_step_end is Callback.on_step_end else step + 1

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> bool | None:
        """Return True to stop training after this epoch."""

    def on_train_end(self, state: Any, history: dict) -> None:
        pass

    def final_state(self, state: Any) -> Any:
        """The state training should end with (e.g. the best one); default: unchanged."""
        return state


def _boundary(callback: Any, step: int) -> int | None:
    """`Callback.next_step_boundary` of any object with the hooks (not only subclasses): one
    without the method sees every step."""
    fn = getattr(callback, "next_step_boundary", None)
    return step + 1 if fn is None else fn(step)


class CallbackList:
    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = list(callbacks)

    def on_train_begin(self, state, info):
        for c in self.callbacks:
            c.on_train_begin(state, info)

    def on_step_end(self, step, info):
        for c in self.callbacks:
            c.on_step_end(step, info)

    def next_step_boundary(self, step) -> int | None:
        ends = [b for c in self.callbacks if (b := _boundary(c, step)) is not None]
        return min(ends) if ends else None

    def on_epoch_end(self, epoch, metrics) -> bool:
        stop = False
        for c in self.callbacks:
            stop = bool(c.on_epoch_end(epoch, metrics)) or stop
        return stop

    def on_train_end(self, state, history):
        for c in self.callbacks:
            c.on_train_end(state, history)

    def final_state(self, state):
        for c in self.callbacks:
            state = c.final_state(state)
        return state


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs; end on the best state.

    Keeps an on-device copy of the best state (the train step donates its input, so the copy
    is needed). ``best``, ``best_epoch`` and ``stopped_epoch`` record what happened.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 20, mode: str = "min",
                 min_delta: float = 0.0, restore_best: bool = True):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode={mode!r}; use 'min' or 'max'.")
        if patience < 1:
            raise ValueError(f"EarlyStopping patience={patience} must be >= 1.")
        self.monitor, self.patience, self.mode = monitor, patience, mode
        self.min_delta, self.restore_best = min_delta, restore_best
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = -1
        self.stopped_epoch: int | None = None
        self._wait = 0
        self._state = None
        self._best_state = None

    def on_step_end(self, step, info):
        self._state = info.state

    def next_step_boundary(self, step):
        if type(self).on_step_end is not EarlyStopping.on_step_end:
            return step + 1  # (a subclass that does more per step)
        return None  # it keeps the latest state, read at epoch ends (where chunks end)

    def _improved(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, epoch, metrics):
        if self.monitor not in metrics:
            return None
        value = metrics[self.monitor]
        if self._improved(value):
            self.best, self.best_epoch, self._wait = value, epoch, 0
            if self.restore_best and self._state is not None:
                self._best_state = tree_copy(self._state)
            return None
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            log.info("early stopping at epoch %d: %s did not improve on %.6g (epoch %d) for %d "
                     "epochs", epoch, self.monitor, self.best, self.best_epoch, self.patience)
            return True
        return None

    def final_state(self, state):
        if self.restore_best and self._best_state is not None:
            return self._best_state
        return state
