"""Asynchronous, reshardable Orbax checkpoints of a whole training state.

A thin wrapper over `orbax.checkpoint.CheckpointManager`. A step directory `<dir>/<step>/` holds
(besides Orbax's own `_CHECKPOINT_METADATA`, `commit_success.txt`, ...):

- `state/`: every array leaf of the state, as a flat dict keyed by `jax.tree_util.keystr` paths
  (`StandardSave`, OCDBT + zstd); typed PRNG keys are stored as their key data;
- `metadata/metadata`: a JSON record (`JsonSave`), e.g. from `model_file.make_metadata`;
- `data/metadata`: the data iterator's position (`get_state()`, JSON), only when a
  `data_iterator` is given. The pipelines of `distributed.data` have one position for all
  processes (the count of global batches consumed), so one record serves any process count
  (positions that differ between processes are kept per process);
- `metrics/metrics`: the `metrics` of `save`, when a `best_metric` is tracked.

Arrays are saved with Orbax; Python numbers, booleans and strings among the leaves are saved as
JSON (the step's custom metadata) and restored from there. The custom metadata also records a
checksum of every saved array (`distributed.checkpoint.checksum`, computed on the devices), and
a restore verifies it: a step whose data changed on disk counts as corrupt.

Restoring needs a template state whose array leaves are arrays or `jax.ShapeDtypeStruct`s
carrying the *target* shardings; Orbax reshards, so a checkpoint written on one mesh restores
onto any other. Other leaves (functions, `None`) come from the template. Nothing is pickled.

Plain Orbax reads a step too: ``ocp.CheckpointManager(dir).restore(step)`` returns the items
``state`` (a flat dict keyed by key paths), ``metadata`` and ``data`` (JSON).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from .checksum import array_checksums
from .deferred import DEFERRED, Checksums, Deferred, MetadataHandler, Worker, save_view, warm
from .flat import (
    data_record,
    scalar_leaves,
    to_flat,
)
from .leaves import jsonable
from .restore import restore

logger = logging.getLogger(__name__)

_FORMAT = "distributed.checkpoint/1"
_TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


@dataclasses.dataclass
class SaveStats:
    """Timings of one save; `total_s` and `bytes` stay `None` until it has committed."""

    step: int
    wait_prev_s: float  # waiting for the previous asynchronous save to commit
    blocking_s: float  # this save's blocking part: device -> host copies, dispatch
    total_s: float | None = None  # from the start of the blocking part to the commit
    bytes: int | None = None  # size of the committed step directory


def _best_fn(name: str, mode: str) -> Callable[[dict], float]:
    worst = math.inf if mode == "min" else -math.inf

    def best_fn(metrics: dict) -> float:
        value = float(metrics[name])
        return value if math.isfinite(value) else worst  # a NaN step is never the best

    return best_fn


def _handlers() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The items' handlers. Explicit: without them a fresh manager cannot read the items'
    metadata."""
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler, json_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
    meta_handler = MetadataHandler()  # reads the checksums in the commit thread
    registry.add("state", ocp.args.StandardSave, state_handler)
    registry.add("state", ocp.args.StandardRestore, state_handler)
    registry.add("metadata", ocp.args.JsonSave, meta_handler)
    registry.add("metadata", ocp.args.JsonRestore, meta_handler)
    registry.add("data", ocp.args.JsonSave, json_handler)
    registry.add("data", ocp.args.JsonRestore, json_handler)
    return registry


def _warn_incomplete_steps(directory: str) -> None:
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        if match := _TMP_STEP.match(name):
            logger.warning(
                "ignoring incomplete checkpoint step %s in %s: an interrupted save left %s "
                "(Orbax deletes it)",
                *(match.group(1), directory, name),
            )


# -------------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Asynchronous Orbax checkpoints of a training state, its data position and metadata.

    Call every method on every process (Orbax coordinates the writes). Use it as a context
    manager, or call `close()`, so that a pending save commits before the program exits.

    Args:
        directory: where the step directories go (created if missing).
        max_to_keep: how many of the most recent steps to keep (`None`: all).
        async_save: write in a background thread; `save` returns once the arrays are off device.
        best_metric: the entry of `save(..., metrics=...)` that ranks steps.
        best_mode: `"min"` or `"max"`: which end of `best_metric` is best.
        keep_best: also keep this many best steps (default 1 when `best_metric` is set).

    Example:
        >>> with CheckpointManager(workdir / "checkpoints") as ckpt:
        ...     ckpt.save(step, state, data_iterator=it, metadata={"phase": 1})
        ...     state, metadata, step = ckpt.restore(abstract_state, data_iterator=it)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        keep_best: int | None = None,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"`max_to_keep` must be None or >= 1, got {max_to_keep=}.")
        if best_mode not in ("min", "max"):
            raise ValueError(f"`best_mode` must be 'min' or 'max', got {best_mode=}.")
        if keep_best is not None and keep_best < 0:
            raise ValueError(f"`keep_best` must be None or >= 0, got {keep_best=}.")
        self.directory = os.path.abspath(os.fspath(directory))  # Orbax needs absolute paths
        self.best_metric = best_metric
        self.last_save: SaveStats | None = None
        self._async = async_save
        # Single process, asynchronous: Orbax's own blocking part runs on a worker thread,
        # after the arrays are copied on their devices (see `deferred`).
        self._worker = Worker() if async_save and jax.process_count() == 1 and DEFERRED else None
        self._start = 0.0
        _warn_incomplete_steps(self.directory)

        keep: list[Any] = [policies.LatestN(n=max_to_keep)]
        best_fn = None if best_metric is None else _best_fn(best_metric, best_mode)
        if best_fn is not None:
            keep.append(
                policies.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",  # BestN keeps the *last* n after sorting
                    n=1 if keep_best is None else keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,  # makes Orbax write the metrics and answer `best_step()`
            best_mode=best_mode,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._on_commit)
            if async_save
            else None,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_handlers()
        )

    def _idle(self) -> None:
        if self._worker is not None:  # Orbax's manager is not thread-safe: one caller at a time
            self._worker.wait(raise_error=False)

    def all_steps(self) -> list[int]:
        """The committed steps, ascending."""
        self._idle()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or `None`."""
        self._idle()
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest step if none is tracked)."""
        self._idle()
        return self._mngr.best_step()

    def warm(self, state: Any) -> None:
        """Compile what `save` runs on the devices (checksums, and the on-device snapshot of
        asynchronous saves) for states like ``state``, so that the first save compiles
        nothing. Optional: call it once before training, e.g. after restoring."""
        warm(save_view(to_flat(state)[0]), copies=self._worker is not None)

    @property
    def last_save_blocking_s(self) -> float | None:
        """Seconds the last `save` blocked its caller, not counting the previous save's wait."""
        return None if self.last_save is None else self.last_save.blocking_s

    def step_bytes(self, step: int) -> int:
        """Bytes on disk of a committed step."""
        walk = os.walk(os.path.join(self.directory, str(step)))
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in walk for f in files)

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: Any = None,
        metadata: dict | None = None,
        metrics: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving the arrays of `state` as `step`.

        With `async_save`, this returns once the arrays are safe from the caller (it may then
        donate them): in a single-process run, once copies of them on their devices and their
        checksums are dispatched (Orbax's own save then runs on a worker thread; the copies
        cost device memory until Orbax has them on the host), otherwise once Orbax has copied
        them to the host. `wait()` blocks until the step is committed (and raises a failed
        save's error). Timings: `last_save`. `warm(state)` first, and the first save compiles
        nothing.

        Args:
            step: the step number; a step not after the latest is skipped.
            state: any pytree; its array leaves (sharded or not, typed keys too) are saved.
            data_iterator: a Grain iterator whose position is saved with the state.
            metadata: a JSON-serialisable dict, readable later with plain `json`.
            metrics: numbers; `best_metric` among them ranks this step.
            force: save even where Orbax's save-decision policy would skip the step.

        Returns:
            Whether a save was started.
        """
        metadata = jsonable(dict(metadata or {}))
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`metadata` must be JSON-serialisable: {e}") from None
        if metrics is not None:
            metrics = {str(k): float(v) for k, v in dict(metrics).items()}
            if self.best_metric is not None and self.best_metric not in metrics:
                raise ValueError(
                    f"`metrics` must include the best_metric {self.best_metric!r}; "
                    f"got {sorted(metrics)}."
                )
        t0 = time.perf_counter()
        self.wait()
        background = self._worker is not None
        if background and not (force or self._mngr.should_save(int(step))):
            logger.info("checkpoint step %d skipped (latest: %s)", step, self.latest_step())
            return False
        flat, impls = to_flat(state)
        flat = save_view(flat)  # one replica of each replicated array (single process)
        custom = {"format": _FORMAT, "prng_impls": impls, "scalars": scalar_leaves(state)}
        if DEFERRED:  # dispatched now, read in Orbax's commit thread (see `deferred`)
            checksums = Checksums(flat, copies=background)
            flat, item = checksums.copies, Deferred(metadata, custom, checksums)
        else:
            item, custom["checksums"] = metadata, array_checksums(flat)
        items = {"state": ocp.args.StandardSave(flat), "metadata": ocp.args.JsonSave(item)}
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(data_record(data_iterator.get_state()))

        self._start = time.perf_counter()
        stats = self.last_save = SaveStats(int(step), self._start - t0, math.nan)
        call = functools.partial(
            self._mngr.save, int(step), args=ocp.args.Composite(**items), metrics=metrics,
            force=force, custom_metadata=custom)  # Orbax writes it after the items' commits
        try:
            if background:
                self._worker.submit(call)
                saved = True
            else:
                saved = call()
        except BaseException:
            self.last_save = None
            raise
        stats.blocking_s = time.perf_counter() - self._start
        if not saved:
            self.last_save = None
            logger.info("checkpoint step %d skipped (latest: %s)", step, self.latest_step())
            return False
        if not self._async:
            stats.total_s = stats.blocking_s
        logger.info("checkpoint step %d: blocked %.3fs", step, stats.blocking_s)
        return True

    def _on_commit(self) -> None:
        # Orbax's background thread, primary process only, just before the final rename.
        if self.last_save is not None and self.last_save.total_s is None:
            self.last_save.total_s = time.perf_counter() - self._start

    def wait(self) -> None:
        """Block until the pending save (if any) has committed; raises its error, if any."""
        if self._worker is not None:
            self._worker.wait()
        self._mngr.wait_until_finished()
        stats = self.last_save
        if stats is None or stats.bytes is not None:
            return
        if stats.total_s is None:  # non-primary processes get no commit callback
            stats.total_s = time.perf_counter() - self._start
        if stats.step in self._mngr.all_steps():
            stats.bytes = self.step_bytes(stats.step)
            logger.info(
                "checkpoint step %d committed: %.1f MB, %.3fs (blocking %.3fs)",
                *(stats.step, stats.bytes / 1e6, stats.total_s, stats.blocking_s),
            )

    def close(self) -> None:
        """Wait for the pending save, then release Orbax's resources."""
        try:
            self.wait()
        finally:
            if self._worker is not None:
                self._worker.close()
            self._mngr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def restore(
        self, abstract_state: Any, *, step: int | None = None, data_iterator: Any = None
    ) -> tuple[Any, dict, int]:
        """Restore a saved state into the layout of `abstract_state`.

        Args:
            abstract_state: the state pytree. Its array leaves (arrays or
                `jax.ShapeDtypeStruct`s) give each restored array's shape, dtype and sharding;
                leaves without a sharding are restored replicated. Other leaves are kept, but
                Python scalars and strings take their saved values.
            step: the step to restore. `None`: the latest, falling back (with a warning) past
                incomplete or corrupt steps (unreadable, or an array whose checksum differs);
                those are set aside as ``<step>.corrupt``.
            data_iterator: an iterator with ``get_state`` / ``set_state``, set to the saved
                position.

        Returns:
            `(state, metadata, step)`.

        Raises:
            CheckpointError: no usable step (or the given `step` is missing or unusable).
            CheckpointMismatch: the checkpoint's arrays differ from the template's (names them).
        """
        self.wait()
        return restore(self._mngr, self.directory, abstract_state, step=step,
                       data_iterator=data_iterator)
