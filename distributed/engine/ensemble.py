"""The engine's pieces for an ensemble (`build(..., ensemble=Ensemble(...))`): the members'
state and step (`distributed.core.ensemble`), and an evaluator scoring every member."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import numpy as np

from ..core.ensemble import Ensemble, init_members, member_key
from ..core.ratio import Ratio
from ..core.state import TrainState
from ..core.step import StepOptions, TrainStep
from .evaluator import Evaluator


def _over_members(reduce: Callable) -> Callable:
    """``reduce(model, batch)`` for each member of a member-stacked model (leading axis K)."""
    return eqx.filter_vmap(reduce, in_axes=(eqx.if_array(0), None))


def finite_mean(values: list[float]) -> float:
    """The mean of the finite ``values`` (NaN when none is): an ensemble's score, not spoiled by
    a member that diverged."""
    ok = [v for v in values if math.isfinite(v)]
    return float(np.mean(ok)) if ok else math.nan


class EnsembleEvaluator(Evaluator):
    """`Evaluator` of an ensemble: every member's metrics on every row (same arguments; the
    model shardings are the ensemble's).

    Calling it returns, for each metric ``m``, ``m`` (the mean over the members whose score is
    finite) and ``m_member<i>`` (member ``i``'s). `evaluate` gathers each output with a leading
    member axis: ``(K, N, ...)``.
    """

    def _per_example(self, metric_fn: Callable, takes_key: bool) -> Callable:
        return _over_members(super()._per_example(metric_fn, takes_key))

    def _whole(self, metric_fn: Callable, takes_key: bool) -> Callable:
        return _over_members(super()._whole(metric_fn, takes_key))

    def _evaluate(self, model: Any) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        totals, outs = self._sums(model)
        scores: dict[str, float] = {}
        for k, (num, den) in totals.items():
            per = [float(Ratio(num[i], den[i]).value()) for i in range(len(num))]
            scores[k] = finite_mean(per)
            scores.update({member_key(k, i): v for i, v in enumerate(per)})
        gathered = {k: np.concatenate([np.asarray(o[k])[:, :valid] for o, valid in outs], 1)
                    for k in self.outputs}
        return scores, gathered


def build_members(task: Any, optimizers: dict, ensemble: Ensemble, *, mesh: Any,
                  strategy: str, options: StepOptions, train_step: TrainStep | None
                  ) -> tuple[TrainState, TrainState, TrainStep]:
    """``(state, shardings, step)`` of ``task``'s ensemble (its ``model`` is ``key ->
    model``); ``train_step`` (an earlier build's) is reused when given."""
    from ..core.ensemble_step import EnsembleStep

    state, shardings = init_members(task.model, optimizers, task.blocks, ensemble, mesh=mesh,
                                    strategy=strategy)
    if train_step is None:
        blocks = task.blocks(state.model) if callable(task.blocks) else dict(task.blocks)
        train_step = EnsembleStep(task.loss_fn, optimizers, blocks, mesh=mesh,
                                  state_shardings=shardings, options=options)
    return state, shardings, train_step
