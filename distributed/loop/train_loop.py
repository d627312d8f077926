"""`train_loop`: seed 002's API (``state, train_step_fn, data_iterator_fn, num_epochs,
num_batches, rng_key, ...``) over `run_loop`."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import jax

from ..core.clock import EpochClock
from .checkpointing import Checkpointer
from .chunks import mean_metrics
from .loop import History, run_loop


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
        rng_key: base PRNG key; step ``s`` gets its own key, ``fold_in(rng_key, s)`` (``None``:
            pass None).
        checkpoint_dir: save asynchronous Orbax checkpoints here (``None``: no checkpoints).
        checkpoint_every: save every this many epochs.
        val_step_fn: ``(state, batch, rng_key) -> (state, metrics_dict)``.
        val_data_iterator: validation batches: an iterable (materialised once and reused each
            epoch) or a zero-argument callable returning a fresh iterator.
        val_num_batches: validation batches per evaluation (default: all).
        show_progress: a tqdm bar on a terminal, periodic log lines otherwise.
        **options: see `run_loop` (``evaluate`` — e.g. a `distributed.engine.Evaluator`, which
            scores every row — callbacks, hooks, data_iterator, checkpointer, resume, ...).

    Returns:
        ``(final_state, history)``: history maps ``train_<metric>`` / ``val_<metric>`` to
        per-epoch lists.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be a positive integer.")
    if val_step_fn is not None:
        options["evaluate"] = _ValSteps(val_step_fn, val_data_iterator, val_num_batches, rng_key)
    made = checkpoint_dir is not None and "checkpointer" not in options
    if made:
        options["checkpointer"] = Checkpointer(checkpoint_dir, every_epochs=checkpoint_every,
                                               data_iterator=options.get("data_iterator"))
    try:
        state, result = run_loop(state, train_step_fn, data_iterator_fn=data_iterator_fn,
                                 num_epochs=num_epochs, clock=EpochClock(num_batches, 1),
                                 rng_key=rng_key, show_progress=show_progress, **options)
    finally:
        if made:
            options["checkpointer"].close()
    return state, result.history


class _ValSteps:
    """``evaluate(state)`` from seed 002's ``val_step_fn`` and validation batches."""

    def __init__(self, val_step_fn, source, num, rng_key):
        self.fn, self.source, self.num, self.rng_key = val_step_fn, source, num, rng_key
        self.cache: list | None = None

    def __call__(self, state) -> dict[str, float]:
        if callable(self.source) and not hasattr(self.source, "__next__"):
            batches = iter(self.source())
        else:
            if self.cache is None:
                src = self.source if self.source is not None else ()
                self.cache = list(itertools.islice(src, self.num) if self.num else src)
            batches = iter(self.cache)
        if self.num:
            batches = itertools.islice(batches, self.num)
        results = []
        for i, batch in enumerate(batches):
            key = None if self.rng_key is None else jax.random.fold_in(self.rng_key,
                                                                        2**31 - 1 - i)
            results.append(self.fn(state, batch, key)[1])
        return mean_metrics(results)
