"""Many steps per dispatch: where the loop's chunks end, and their metrics.

With device-resident input (`distributed.data.DeviceData`) the step function can run ``k``
steps in one call (`distributed.engine.PhaseStep.run_many`). The loop then advances chunk by
chunk, and every chunk ends where the loop has host work to do, so that work happens on the
same steps as step by step: log points (and step 1), checkpoint saves, hooks, epoch ends
(validation, epoch records, early stopping), BCD phase starts, ``max_steps``, the steps at which
processes agree on a preemption, and the steps a callback asks for.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from ..core.ensemble import MEMBER_SUFFIX, member_key

log = logging.getLogger(__name__)
_MEMBER = re.compile(rf"^(.*){MEMBER_SUFFIX}(\d+)$")


@dataclasses.dataclass
class Chunk:
    """Steps ``start + 1 .. start + n`` (1-based counts) run in one call; ``metrics`` are
    ``{name: (k, ...)}`` device arrays whose first ``n`` rows are the steps' metrics."""

    start: int
    n: int
    metrics: dict[str, Any]
    _host: list[dict[str, np.ndarray]] | None = None

    def rows(self) -> list[dict[str, np.ndarray]]:
        """Each step's metrics on the host (one transfer, cached)."""
        if self._host is None:
            host = jax.device_get(self.metrics)
            self._host = [{k: v[i] for k, v in host.items()} for i in range(self.n)]
        return self._host

    def last(self) -> dict[str, Any]:
        """The last step's metrics, still on the device."""
        return {k: v[self.n - 1] for k, v in self.metrics.items()}


def per_step(items: Iterable[Any]) -> list[Any]:
    """Step metrics with every `Chunk` expanded into its steps' rows."""
    out: list[Any] = []
    for it in items:
        out.extend(it.rows() if isinstance(it, Chunk) else [it])
    return out


def steps_per_call(fn: Any, data: Any, *, recovery: bool) -> int:
    """The most steps the loop may hand ``fn`` in one call (1: step by step).

    More than one needs a step function with ``run_many`` whose input is drawn on the device
    from its ``device_data``, and ``data`` must be that iterator. Loss-explosion recovery
    checks each step's loss on the host before it lets training go on, so it runs step by
    step.
    """
    k = int(getattr(fn, "max_steps_per_call", 0) or 0)
    if k <= 1 or data is None or getattr(fn, "device_data", None) is not data:
        return 1  # (run_many draws from fn's own device data: the loop's must be that one)
    if recovery:
        log.info("loss-explosion recovery reads every step's loss: one step per dispatch")
        return 1
    return k


def chunk_end(step: int, limit: int, *, periods: Sequence[int], boundaries: Sequence[int | None],
              cap: int) -> int:
    """The step count at which a chunk starting after ``step`` steps ends: the first multiple
    of any of ``periods`` (``<= 0``: none), the first of ``boundaries`` after ``step``, ``step +
    cap`` or ``limit``, whichever comes first."""
    end = min(limit, step + cap)
    for p in periods:
        if p > 0:
            end = min(end, (step // p + 1) * p)
    for b in boundaries:
        if b is not None and b > step:
            end = min(end, b)
    return max(end, step + 1)


def mean_metrics(items: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-key means of a list of step metrics, in one transfer. Steps whose update was skipped
    (``finite == 0``) are left out of every mean but ``finite``'s own (the fraction finite); an
    ensemble member's metric ``m_member<i>`` leaves out the steps member ``i`` skipped
    (``finite_member<i> == 0``)."""
    if not items:
        return {}
    host = jax.device_get(per_step(items))
    out = {}
    for k in dict.fromkeys(k for m in host for k in m):
        member = _MEMBER.match(k)
        if k in ("finite", "nonfinite_count") or (member and member[1] == "finite"):
            guard = None
        else:
            guard = member_key("finite", int(member[2])) if member else "finite"
        vals = [float(np.asarray(m[k])) for m in host
                if k in m and (guard is None or float(np.asarray(m.get(guard, 1))) > 0)]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out
