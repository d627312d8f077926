"""`PhaseStep`: the train step function that follows a BCD phase plan."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..core import bcd
from ..core.clock import EpochClock
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
    """

    def __init__(self, train_step: TrainStep, plan: Sequence[bcd.Phase], clock: EpochClock,
                 model_shardings: Any, mesh: Mesh,
                 extras: Callable[[int, int], Mapping[str, float]] | None = None):
        self.train_step, self.plan, self.clock = train_step, tuple(plan), clock
        self.model_shardings, self.mesh, self.extras = model_shardings, mesh, extras
        self.bounds = bcd.phase_boundaries(self.plan, clock)
        self._first_epoch = np.cumsum([0] + [p.epochs for p in self.plan]).tolist()
        self.phase, self._next = -1, 0
        self._last: Any = None
        self._extra_cache: dict[tuple, jax.Array] = {}

    def phase_at(self, step: int) -> int:
        """The phase of batch index ``step`` (0-based)."""
        return bcd.phase_at(self.plan, step, self.clock)

    def __call__(self, state: TrainState, batch: dict, key: Any = None, *,
                 step: int | None = None):
        del key  # the train step derives its keys from state.key and state.step
        if self._last is None or state is not self._last:
            self.phase, self._next = (int(x) for x in jax.device_get((state.phase, state.step)))
        step = self._next if step is None else step
        self._next = step + 1
        p = self.phase_at(step)
        if p != self.phase:
            state = self._enter(state, p, step)
        if self.extras is not None:
            batch = self._with_extras(batch, p, step)
        self._last, metrics = self.train_step(state, batch, self.plan[p].blocks)
        return self._last, metrics

    def _enter(self, state: TrainState, p: int, step: int) -> TrainState:
        model = bcd.enter_phase(state.model, self.plan, self.phase, p)
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
