"""Asynchronous, reshardable Orbax checkpoints of a whole training state.

A thin wrapper over `orbax.checkpoint.CheckpointManager`. A step directory `<dir>/<step>/` holds
(besides Orbax's own `_CHECKPOINT_METADATA`, `commit_success.txt`, ...):

- `state/`: every array leaf of the state, as a flat dict keyed by `jax.tree_util.keystr` paths
  (`StandardSave`, OCDBT + zstd); typed PRNG keys are stored as their key data;
- `metadata/metadata`: a JSON record (`JsonSave`), e.g. from `model_io.make_metadata`;
- `data/process_<i>-of-<n>.json`: the Grain iterator position of each process (Grain's Orbax
  handler), only when a `data_iterator` is given;
- `metrics/metrics`: the `metrics` of `save`, when a `best_metric` is tracked.

Only arrays are saved. Restoring needs a template state whose array leaves are arrays or
`jax.ShapeDtypeStruct`s carrying the *target* shardings; Orbax reshards, so a checkpoint written on
one mesh restores onto any other. Non-array leaves (functions, strings, Python scalars, `None`)
come from the template. Nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any, Literal

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import checkpoint_managers as policies

from .model_io import CheckpointError, is_key, jsonable, key_impl

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


class _Mismatch(ValueError):
    """The checkpoint is readable but does not fit the template: not a corruption."""


# ------------------------------------------------------------------------ pytree <-> flat dict


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _name(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _replicated() -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def _host_local(sharding) -> bool:
    """A sharding on this process's devices only, in a multi-process run."""
    return jax.process_count() > 1 and sharding.is_fully_addressable


def _to_flat(state: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """`{keystr(path): array}` (typed keys as key data), and `{path: PRNG impl}` of the keys.

    In multi-process runs a host-local array (e.g. a scalar made outside jit) is taken to hold
    the same value on every process, and becomes a replicated global array Orbax can save.
    """
    flat, impls = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(f"Cannot save the abstract leaf {_name(path)}: {leaf}.")
        if not _is_array(leaf):
            continue
        if is_key(leaf):
            impls[_name(path)] = key_impl(leaf)
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and _host_local(leaf.sharding):
            leaf = jax.make_array_from_process_local_data(_replicated(), np.asarray(leaf))
        flat[_name(path)] = leaf
    return flat, impls


def _target_leaf(leaf: Any) -> Any:
    """The Orbax restore target of a template leaf: its shape, dtype and sharding.

    Leaves without a sharding (e.g. from `eqx.filter_eval_shape`), and host-local ones in
    multi-process runs, are restored replicated on every device.
    """
    if isinstance(leaf, np.ndarray):
        return leaf  # restored as a host numpy array
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or _host_local(sharding):
        sharding = _replicated()
    shape = jax.eval_shape(jax.random.key_data, leaf) if is_key(leaf) else leaf
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def _from_flat(template: Any, flat: dict[str, Any], impls: dict[str, str], where: str) -> Any:
    """`template` with its array leaves taken from `flat` (typed keys re-wrapped)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths_leaves:
        name = _name(path)
        if not _is_array(leaf):
            leaves.append(leaf)
        elif is_key(leaf):
            impl = key_impl(leaf)
            if impls.get(name, impl) != impl:
                raise _Mismatch(f"{where}: {name} is a {impls[name]!r} key, not {impl!r}.")
            leaves.append(jax.random.wrap_key_data(flat[name], impl=impl))
        else:
            leaves.append(flat[name])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_matches(where: str, saved: dict, target: dict) -> None:
    """Raise naming every difference between the saved arrays and the template's."""
    problems = [f"{n}: in the checkpoint, not in the template" for n in saved.keys() - target]
    problems += [f"{n}: in the template, not in the checkpoint" for n in target.keys() - saved]
    for name in saved.keys() & target.keys():
        got, want = saved[name], target[name]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            problems.append(
                f"{name}: checkpoint has shape {tuple(got.shape)} {np.dtype(got.dtype)}, "
                f"template has shape {tuple(want.shape)} {np.dtype(want.dtype)}"
            )
    if problems:
        raise _Mismatch(
            f"{where} does not match the template state ({len(problems)} differences):\n  "
            + "\n  ".join(sorted(problems)[:20])
        )


def _all_processes_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process, so that all of them fall back together."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _describe(e: BaseException) -> str:
    """`Type: first line` of the innermost cause (Orbax wraps TensorStore's useful message)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


class _DataHandler(grain_ckpt.CheckpointHandler):
    """Grain's handler (`data/process_<i>-of-<n>.json`), restorable by another process count.

    When this process's file is missing (the step was written by a different number of
    processes) and every saved file holds the same state -- as `distributed.data` iterators do:
    their position is the global batch count -- that state is restored on every process.
    """

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item=item)
        files = sorted(directory.glob("process_*-of-*.json"))
        texts = [f.read_text() for f in files]
        import grain

        is_dataset = isinstance(item, grain.DatasetIterator)  # else a DataLoader's bytes state
        states = [json.loads(t) if is_dataset else t.encode() for t in texts]
        if not states or any(s != states[0] for s in states):
            raise ValueError(
                f"File {own} does not exist, and the data-iterator states saved by "
                f"{len(files)} process(es) differ, so they cannot be shared out."
            )
        logger.info("data iterator: restoring %s (saved by %d processes)", files[0].name,
                    len(files))
        item.set_state(states[0])
        if hasattr(item, "start_prefetch"):
            item.start_prefetch()
        return item

    @classmethod
    def typestr(cls):
        return grain_ckpt.CheckpointHandler.typestr()


def _best_fn(name: str, mode: str) -> Callable[[dict], float]:
    worst = math.inf if mode == "min" else -math.inf

    def best_fn(metrics: dict) -> float:
        value = float(metrics[name])
        return value if math.isfinite(value) else worst  # a NaN step is never the best

    return best_fn


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
        self.directory = os.fspath(directory)
        self.best_metric = best_metric
        self.last_save: SaveStats | None = None
        self._async = async_save
        self._start = 0.0
        self._warn_incomplete_steps()

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
        # Explicit handlers: without them a fresh manager cannot read the items' metadata.
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler, json_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
        data_handler = _DataHandler()
        registry.add("state", ocp.args.StandardSave, state_handler)
        registry.add("state", ocp.args.StandardRestore, state_handler)
        registry.add("metadata", ocp.args.JsonSave, json_handler)
        registry.add("metadata", ocp.args.JsonRestore, json_handler)
        registry.add("data", grain_ckpt.CheckpointSave, data_handler)
        registry.add("data", grain_ckpt.CheckpointRestore, data_handler)
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    def all_steps(self) -> list[int]:
        """The committed steps, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or `None`."""
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """The step with the best `best_metric` (the latest step if none is tracked)."""
        return self._mngr.best_step()

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

        With `async_save`, this returns once the arrays are copied off device (the caller may
        then donate them); `wait()` blocks until the step is committed. Timings: `last_save`.

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
        flat, impls = _to_flat(state)
        items = {"state": ocp.args.StandardSave(flat), "metadata": ocp.args.JsonSave(metadata)}
        if data_iterator is not None:
            items["data"] = grain_ckpt.CheckpointSave(data_iterator)

        self._start = time.perf_counter()
        stats = self.last_save = SaveStats(int(step), self._start - t0, math.nan)
        try:
            saved = self._mngr.save(
                int(step),
                args=ocp.args.Composite(**items),
                metrics=metrics,
                force=force,
                custom_metadata={"format": _FORMAT, "prng_impls": impls},
            )
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
                leaves without a sharding are restored replicated. Other leaves are kept.
            step: the step to restore. `None`: the latest, falling back (with a warning) past
                incomplete or corrupt steps.
            data_iterator: a Grain iterator, set in place to the saved position.

        Returns:
            `(state, metadata, step)`.

        Raises:
            CheckpointError: no usable step (or the given `step` is missing or unusable).
            ValueError: the checkpoint's arrays differ from the template's (names them).
        """
        self.wait()
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise CheckpointError(
                f"No committed checkpoint step {step} in {self.directory}; steps: {steps}."
            )
        candidates = [step] if step is not None else steps[::-1]
        if not candidates:
            raise CheckpointError(f"No checkpoint steps in {self.directory}.")
        target = {
            _name(path): _target_leaf(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
            if _is_array(leaf)
        }
        data_before = None if data_iterator is None else data_iterator.get_state()
        failures, failed = [], []
        for s in candidates:
            try:
                result, error = self._restore_step(s, abstract_state, target, data_iterator), None
            except _Mismatch:
                raise
            except Exception as e:  # noqa: BLE001 - failing to read a step means "corrupt"
                result, error = None, e
            if _all_processes_ok(error is None):
                if failed:
                    self._set_aside(failed)
                return result
            reason = "it failed on another process" if error is None else _describe(error)
            if step is not None:
                raise CheckpointError(
                    f"Checkpoint step {s} in {self.directory} is unusable ({reason})."
                ) from error
            failures.append(f"step {s}: {reason}")
            failed.append(s)
            logger.warning(
                "checkpoint step %d in %s is incomplete or corrupt (%s); trying the previous step",
                *(s, self.directory, reason),
            )
        if data_iterator is not None:
            data_iterator.set_state(data_before)
        raise CheckpointError(f"No usable checkpoint in {self.directory}: " + "; ".join(failures))

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unusable steps newer than the restored one to `<step>.corrupt[-k]`.

        Otherwise they stay the "latest" step, and Orbax skips every save up to them: the
        resumed run could not checkpoint those steps again. Renamed, not deleted (inspectable).
        """
        if jax.process_index() == 0:
            for s in steps:
                src = os.path.join(self.directory, str(s))
                dst, k = f"{src}.corrupt", 1
                while os.path.exists(dst):
                    dst, k = f"{src}.corrupt-{k}", k + 1
                try:
                    os.rename(src, dst)
                    logger.warning("moved the unusable checkpoint step %d aside to %s", s, dst)
                except OSError as e:
                    logger.warning("could not move the unusable checkpoint step %d aside: %s", s, e)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("distributed.checkpoint.set_aside")
        self._mngr.reload()

    def _restore_step(self, step: int, template: Any, target: dict, data_iterator: Any):
        where = f"Checkpoint step {step} in {self.directory}"
        step_metadata = self._mngr.metadata(step)
        saved = self._mngr.item_metadata(step)["state"]
        if saved is None:
            raise CheckpointError(f"cannot read the array metadata of step {step}")
        _check_matches(where, dict(saved), target)
        items = {"state": ocp.args.StandardRestore(target), "metadata": ocp.args.JsonRestore()}
        if data_iterator is not None:
            recorded = "data" in (step_metadata.item_handlers or ())
            if not recorded and not os.path.isdir(os.path.join(self.directory, str(step), "data")):
                raise _Mismatch(f"{where} has no data-iterator state; pass data_iterator=None.")
            items["data"] = grain_ckpt.CheckpointRestore(data_iterator)
        restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        if not isinstance(restored["metadata"], dict):
            raise CheckpointError(f"the metadata of step {step} is not a JSON object")
        impls = (step_metadata.custom_metadata or {}).get("prng_impls", {})
        return _from_flat(template, restored["state"], impls, where), restored["metadata"], step

    def _warn_incomplete_steps(self) -> None:
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if match := _TMP_STEP.match(name):
                logger.warning(
                    "ignoring incomplete checkpoint step %s in %s: an interrupted save left %s "
                    "(Orbax deletes it)",
                    *(match.group(1), self.directory, name),
                )
