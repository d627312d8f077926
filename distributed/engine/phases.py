"""`PhaseStep`: the train step function that follows a BCD phase plan."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..core import bcd
from ..core.clock import EpochClock
from ..core.multistep import for_step
from ..core.sharding import batch_sharding, shard
from ..core.state import TrainState
from ..core.step import TrainStep

log = logging.getLogger(__name__)


class PhaseStep:
    """``(state, batch, key, *, step) -> (state, metrics)`` for `run_loop`, following a plan.

    The loop passes ``step``, the number of steps done before this one (without it, a host
    counter continues from ``state.step``); the phase is a function of it (`bcd.phase_at`), so
    no device value is read per step. Entering a phase applies the
    first-run rule (`bcd.enter_phase`) and records the phase in ``state.phase``. A state other
    than the one last returned (a resume, a recovery rollback) has its applied phase read back
    from ``state.phase`` once.

    Args:
        train_step: the compiled step (called with the phase's active blocks).
        plan: the phases.
        clock: where epochs (and so phases) begin on the step counter.
        model_shardings: to lay a model changed by the first-run rule back out on the mesh.
        mesh: for the per-row ``extras``.
        extras: ``(phase index, epoch within the phase) -> {name: float}``, added to every
            batch as per-row arrays (cached on device per value).
        enter: ``(model, plan, previous, current) -> model``, the first-run rule
            (`bcd.enter_phase`; an ensemble's applies it to every member).
        device_data: a `distributed.data.DeviceData`: enables `run_many` (many steps per
            dispatch, batches drawn on the device).
        steps_per_call: the most steps `run_many` runs in one call.
    """

    def __init__(self, train_step: TrainStep, plan: Sequence[bcd.Phase], clock: EpochClock,
                 model_shardings: Any, mesh: Mesh,
                 extras: Callable[[int, int], Mapping[str, float]] | None = None,
                 enter: Callable[..., Any] = bcd.enter_phase, device_data: Any = None,
                 steps_per_call: int = 128):
        self.enter = enter
        self.train_step, self.plan, self.clock = train_step, tuple(plan), clock
        self.model_shardings, self.mesh, self.extras = model_shardings, mesh, extras
        self.bounds = bcd.phase_boundaries(self.plan, clock)
        self._first_epoch = np.cumsum([0] + [p.epochs for p in self.plan]).tolist()
        self.phase, self._next = -1, 0
        self._last: Any = None
        self._extra_cache: dict[tuple, jax.Array] = {}
        self.device_data = device_data
        self.max_steps_per_call = steps_per_call if device_data is not None else 0
        self._multi = None if device_data is None else for_step(
            train_step, device_data.layout, functools.partial(_device_batch,
                                                              device_data.layout),
            steps_per_call)

    def phase_at(self, step: int) -> int:
        """The phase of batch index ``step`` (0-based)."""
        return bcd.phase_at(self.plan, step, self.clock)

    def __call__(self, state: TrainState, batch: dict, key: Any = None, *,
                 step: int | None = None):
        del key  # the train step derives its keys from state.key and state.step
        self._sync(state)
        step = self._next if step is None else step
        self._next = step + 1
        p = self.phase_at(step)
        if p != self.phase:
            state = self._enter(state, p, step)
        if self.extras is not None:
            batch = self._with_extras(batch, p, step)
        self._last, metrics = self.train_step(state, batch, self.plan[p].blocks)
        return self._last, metrics

    def _sync(self, state: TrainState) -> None:
        if self._last is None or state is not self._last:
            self.phase, self._next = (int(x) for x in jax.device_get((state.phase, state.step)))

    def next_boundary(self, step: int) -> int:
        """The first phase start (or, with per-epoch extras or device data, epoch end) after
        batch ``step``: a `run_many` chunk may not cross it."""
        later = [b for b in self.bounds if b > step]
        nxt = later[0] if later else sys.maxsize
        if self.extras is not None:
            nxt = min(nxt, self.clock.steps(self.clock.epoch_of(step) + 1))
        if self.device_data is not None:  # a chunk draws from one data epoch's order (and the
            data = self.device_data.clock  # next's, for a batch that straddles them)
            nxt = min(nxt, data.steps(data.epoch_of(step) + 1))
        return nxt

    def run_many(self, state: TrainState, step: int, n: int):
        """Batches ``step .. step + n - 1`` (0-based) in one dispatch, drawn on the device from
        ``device_data``; they must not cross `next_boundary`. Returns the state and
        ``{metric: (steps_per_call, ...)}`` whose first ``n`` rows are the steps' metrics."""
        if n > 1 and step + n > self.next_boundary(step):
            raise ValueError(f"steps {step + 1}..{step + n} cross a phase or epoch boundary "
                             f"at {self.next_boundary(step)}.")
        self._sync(state)
        p = self.phase_at(step)
        if p != self.phase:
            state = self._enter(state, p, step)
        extras = {} if self.extras is None else {
            k: jnp.float32(v) for k, v in self.extras(
                p, self.clock.epoch_of(step) - self._first_epoch[p]).items()}
        args = {"data": self.device_data.chunk_args(step), "extras": extras}
        self._last, metrics = self._multi(state, self.plan[p].blocks, n, args)
        self._next = step + n
        return self._last, metrics

    def _enter(self, state: TrainState, p: int, step: int) -> TrainState:
        model = self.enter(state.model, self.plan, self.phase, p)
        if model is not state.model:
            model = shard(model, self.model_shardings)
        phase = jax.device_put(jnp.asarray(p, jnp.int32), state.phase.sharding)
        log.info("phase %d/%d: %s (blocks %s) from step %d", p + 1, len(self.plan),
                 self.plan[p].name, ",".join(self.plan[p].blocks), step)
        self.phase = p
        return dataclasses.replace(state, model=model, phase=phase)

    def _with_extras(self, batch: dict, p: int, step: int) -> dict:
        epoch_in_phase = self.clock.epoch_of(step) - self._first_epoch[p]
        rows = len(next(iter(batch.values())))
        for k, v in self.extras(p, epoch_in_phase).items():
            arr = self._extra_cache.get((k, v, rows))
            if arr is None:
                arr = jax.device_put(np.full((rows,), v, np.float32), batch_sharding(self.mesh))
                self._extra_cache[(k, v, rows)] = arr
            batch = dict(batch, **{k: arr})
        return batch


def _device_batch(layout: Any, args: Mapping[str, Any], i: Any) -> dict:
    """Batch ``i`` of a chunk drawn on the device (`DeviceData`), with the chunk's per-row
    extras."""
    batch = layout.batch(args["data"], i)
    for k, v in args["extras"].items():
        batch[k] = jax.lax.with_sharding_constraint(
            jnp.full((layout.clock.batch_size,), v), layout.batch_sharding)
    return batch
