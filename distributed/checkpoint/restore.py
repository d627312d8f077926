"""Restoring a checkpoint step into the current mesh, falling back past corrupt steps."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from .checksum import mismatches
from .errors import CheckpointError, CheckpointMismatch
from .flat import (
    check_matches,
    data_state,
    from_flat,
    is_array_leaf,
    name_of,
    target_leaf,
    with_scalars,
)

logger = logging.getLogger(__name__)


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


def restore(mngr: ocp.CheckpointManager, directory: str, abstract_state: Any, *,
            step: int | None, data_iterator: Any) -> tuple[Any, dict, int]:
    """See `CheckpointManager.restore`."""
    steps = sorted(mngr.all_steps())
    if step is not None and step not in steps:
        raise CheckpointError(
            f"No committed checkpoint step {step} in {directory}; steps: {steps}.")
    candidates = [step] if step is not None else steps[::-1]
    if not candidates:
        raise CheckpointError(f"No checkpoint steps in {directory}.")
    target = {
        name_of(path): target_leaf(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        if is_array_leaf(leaf)
    }
    data_before = None if data_iterator is None else data_iterator.get_state()
    failures, failed = [], []
    for s in candidates:
        try:
            result = _restore_step(mngr, directory, s, abstract_state, target, data_iterator)
            error = None
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - failing to read a step means "corrupt"
            result, error = None, e
        if _all_processes_ok(error is None):
            if failed:
                _set_aside(mngr, directory, failed)
            return result
        reason = "it failed on another process" if error is None else _describe(error)
        if step is not None:
            raise CheckpointError(
                f"Checkpoint step {s} in {directory} is unusable ({reason}).") from error
        failures.append(f"step {s}: {reason}")
        failed.append(s)
        logger.warning("checkpoint step %d in %s is incomplete or corrupt (%s); trying the "
                       "previous step", s, directory, reason)
    if data_iterator is not None:
        data_iterator.set_state(data_before)
    raise CheckpointError(f"No usable checkpoint in {directory}: " + "; ".join(failures))


def _set_aside(mngr: ocp.CheckpointManager, directory: str, steps: list[int]) -> None:
    """Rename unusable steps newer than the restored one to `<step>.corrupt[-k]`.

    Otherwise they stay the "latest" step, and Orbax skips every save up to them: the
    resumed run could not checkpoint those steps again. Renamed, not deleted (inspectable).
    """
    if jax.process_index() == 0:
        for s in steps:
            src = os.path.join(directory, str(s))
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
    mngr.reload()


def _restore_step(mngr: ocp.CheckpointManager, directory: str, step: int, template: Any,
                  target: dict, data_iterator: Any):
    where = f"Checkpoint step {step} in {directory}"
    step_metadata = mngr.metadata(step)
    saved = mngr.item_metadata(step)["state"]
    if saved is None:
        raise CheckpointError(f"cannot read the array metadata of step {step}")
    check_matches(where, dict(saved), target)
    items = {"state": ocp.args.StandardRestore(target), "metadata": ocp.args.JsonRestore()}
    if data_iterator is not None:
        recorded = "data" in (step_metadata.item_handlers or ())
        if not recorded and not os.path.isdir(os.path.join(directory, str(step), "data")):
            raise CheckpointMismatch(
                f"{where} has no data-iterator state; pass data_iterator=None.")
        items["data"] = ocp.args.JsonRestore()
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    if not isinstance(restored["metadata"], dict):
        raise CheckpointError(f"the metadata of step {step} is not a JSON object")
    custom = step_metadata.custom_metadata or {}
    bad = mismatches(custom.get("checksums") or {}, restored["state"])
    if bad:
        raise CheckpointError(f"array {bad[0]} does not match its checksum"
                              f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}: the "
                              f"data on disk changed after the save")
    state = from_flat(template, restored["state"], custom.get("prng_impls", {}), where)
    state = with_scalars(state, custom.get("scalars", {}), where)
    if data_iterator is not None:
        data_iterator.set_state(data_state(restored["data"], where))
    return state, restored["metadata"], step
