"""`Task`: what to train, as plain data. Every entry point (the command line, `Trainer`,
`general_train_cycle`, the benchmarks) describes its training as a `Task` and hands it to
`distributed.engine.build`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optax

from ..core import bcd

Blocks = Mapping[str, Any] | Callable[[Any], Mapping[str, Any]]
Optimizers = (Mapping[str, optax.GradientTransformation]
              | Callable[[dict[str, int]], Mapping[str, optax.GradientTransformation]])


def all_params(model: Any) -> dict[str, Any]:
    """One block, ``"all"``: every floating array of the model (plain, non-BCD training)."""
    return {"all": bcd.complete_filter(model)}


@dataclasses.dataclass(frozen=True)
class Task:
    """Everything model-specific the engine needs.

    Attributes:
        model: an Equinox model, or a zero-argument function building one (traced under jit so
            that the parameters are created directly in their sharded layout). An ensemble
            (``build(..., ensemble=...)``) needs a function of a PRNG key, ``key -> model``.
        loss_fn: ``(model, batch[, key=...]) -> loss``: a scalar, a `distributed.Ratio`, or
            either with a dict of aux metrics. ``batch`` is a dict of global arrays with the keys
            of ``train`` (plus ``batch_extras``). A ``key`` keyword gets a fresh PRNG key per step.
        train: the training examples: ``{name: (N, ...) numpy array}``, same ``N`` for all.
        val: validation examples (same keys), or ``None``. Every row is scored.
        plan: the BCD phases (`bcd.make_phase_plan`; `bcd.single_phase_plan(epochs, blocks)` for
            plain training).
        blocks: ``{block: filter spec}`` or ``model -> {block: filter spec}`` (default: one block
            ``"all"`` of every floating array).
        optimizers: ``{block: optax transformation}``, or a function of the number of updates
            each block receives over the plan (``{block: updates}``, for schedules that need the
            run's length) returning them.
        metric_fn: ``(model, batch) -> {name: scalar | Ratio | array}`` evaluated on the
            validation rows (default: ``{"loss": loss_fn}``); see `Evaluator`.
        outputs: names among ``metric_fn``'s results that are per-example outputs (e.g.
            predictions), gathered rather than averaged.
        batch_extras: ``(phase index, epoch within the phase) -> {name: float}``: per-row
            constants added to every batch (e.g. a scheduled L1 rate; traced, so changing them
            does not recompile).
    """

    model: Any
    loss_fn: Callable[..., Any]
    train: Mapping[str, np.ndarray]
    plan: tuple[bcd.Phase, ...]
    val: Mapping[str, np.ndarray] | None = None
    blocks: Blocks = all_params
    optimizers: Optimizers = dataclasses.field(default_factory=dict)
    metric_fn: Callable[..., Mapping[str, Any]] | None = None
    outputs: tuple[str, ...] = ()
    batch_extras: Callable[[int, int], Mapping[str, float]] | None = None

    def __post_init__(self):
        if not self.plan:
            raise ValueError("Task.plan has no phases; use bcd.single_phase_plan(epochs).")
        for name, arrays in (("train", self.train), ("val", self.val)):
            if arrays is None:
                continue
            if not isinstance(arrays, Mapping) or not arrays:
                raise ValueError(f"Task.{name} must be a non-empty dict of arrays, got "
                                 f"{type(arrays).__name__}.")
            lengths = {k: len(v) for k, v in arrays.items()}
            if len(set(lengths.values())) != 1:
                raise ValueError(f"Task.{name}: every array needs the same number of rows; got "
                                 f"{lengths}.")

    @property
    def num_train(self) -> int:
        return len(next(iter(self.train.values())))
