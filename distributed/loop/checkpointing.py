"""`Checkpointer`: the loop's checkpointing as one object: restore, maybe save, commit."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax

from ..checkpoint import CheckpointManager
from ..checkpoint.manager import SaveStats
from .periodic import itstime

log = logging.getLogger(__name__)


def _abstract_like(state: Any) -> Any:
    """Restore target: each array's shape, dtype and CURRENT sharding."""

    def one(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(one, state)


class Checkpointer:
    """When and what the loop saves, and where it resumes from.

    Args:
        manager: a `distributed.checkpoint.CheckpointManager`, or a directory to make one in
            (then closed by `close`).
        every_steps: save after every N steps (0: not by steps).
        every_epochs: save after every N epochs (0: not by epochs).
        data_iterator: a checkpointable iterator (``get_state`` / ``set_state``) whose position
            is saved with each step and restored on resume.
        metadata_fn: ``(state, step, last_metrics) -> dict``: JSON metadata saved with each step.

    The loop calls `restore` once, `maybe_save` after each step (and each epoch), `commit` at
    the end (a final save, then wait until every save is on disk) and `close`.
    """

    def __init__(self, manager: CheckpointManager | str | os.PathLike, *, every_steps: int = 0,
                 every_epochs: int = 0, data_iterator: Any = None,
                 metadata_fn: Callable[[Any, int, dict], dict] | None = None):
        self.owns_manager = not isinstance(manager, CheckpointManager)
        self.manager = CheckpointManager(manager) if self.owns_manager else manager
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.data_iterator, self.metadata_fn = data_iterator, metadata_fn
        self.saved_at = self.manager.latest_step()
        self.restored: dict | None = None

    def restore(self, state: Any) -> tuple[Any, int | None]:
        """The latest valid checkpoint laid out like ``state`` (and the data position set), or
        ``(state, None)`` when there is none. ``restored`` keeps the step's metadata."""
        if self.manager.latest_step() is None:
            return state, None
        state, meta, step = self.manager.restore(_abstract_like(state),
                                                 data_iterator=self.data_iterator)
        self.restored, self.saved_at = {"step": step, "metadata": meta}, step
        return state, step

    def warm(self, state: Any) -> None:
        """Compile what a save runs on the devices, so the first save compiles nothing."""
        self.manager.warm(state)

    def maybe_save(self, step: int, state: Any, last: dict, *,
                   epoch_end: int | None = None) -> SaveStats | None:
        """Save if a step period (or, after epoch ``epoch_end``, an epoch period) is due."""
        due = itstime(step, self.every_steps) or (
            epoch_end is not None and itstime(epoch_end + 1, self.every_epochs))
        return self.save(step, state, last) if due else None

    def save(self, step: int, state: Any, last: dict, *, force: bool = False) -> SaveStats | None:
        """Start saving ``state`` as ``step`` (not twice for one step); returns the save's
        timings, or None when nothing was started."""
        if self.saved_at == step:
            return None
        self.saved_at = step
        meta = self.metadata_fn(state, step, last) if self.metadata_fn else None
        val = {k: v for k, v in last.items() if k.startswith("val_")} or None
        started = self.manager.save(step, state, data_iterator=self.data_iterator,
                                    metadata=meta, metrics=val, force=force)
        return self.manager.last_save if started else None

    def commit(self, step: int, state: Any, last: dict) -> SaveStats | None:
        """Save ``step`` (if not saved yet) and block until every save has committed."""
        stats = self.save(step, state, last, force=True)
        self.manager.wait()
        return stats

    def close(self) -> None:
        """Wait for pending saves; close the manager if this object made it."""
        if self.owns_manager:
            self.manager.close()
        else:
            self.manager.wait()
