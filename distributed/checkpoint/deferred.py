"""What keeps `CheckpointManager.save`'s blocking part short: the arrays Orbax is handed, and the
checksums, read off the devices in Orbax's background commit rather than in the caller.

- `save_view`: in a single-process run a fully replicated array is handed to Orbax as one
  replica (a single-device view of the same buffer). Orbax would otherwise split a replicated
  array into one slice per replica ("replica-parallel" writes, meant to spread the write over
  hosts) with an eager jax slice per replica and array, in the caller's thread: on 8 devices,
  8 dispatches per array and a compile per new slice shape on the first save. The bytes on
  disk are the same; a restore reshards onto its template's shardings as before.
- `Checksums`: the per-array checksums (`checksum.py`) are dispatched on the devices in the
  caller (asynchronous) and fetched by `MetadataHandler` in Orbax's commit thread, which fills
  them into the step's custom metadata before Orbax writes it (Orbax writes the step metadata
  after every item's commit has finished). A save whose checksums fail fails at `wait()`.
- Asynchronous saves in a single process: the same jitted call also copies the arrays on
  their devices, and Orbax's whole `save` (its blocking part: thread starts, device -> host
  copies, tree metadata) runs on a `Worker` thread from those copies. The caller is blocked
  only for the dispatch; the copies cost device memory until Orbax holds them on the host.
  (Across processes Orbax's save runs in the caller: its barriers and collectives must keep
  the same order as the training's on every process.)
- `warm` compiles those jitted calls ahead of the first save.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .checksum import _checksums, _devices

# Orbax 0.12's JsonCheckpointHandler writes its item in `_save_fn`, in the commit thread. If a
# later Orbax drops it, checksums are read in the caller (correct, only slower).
DEFERRED = hasattr(ocp.JsonCheckpointHandler, "_save_fn")


def save_view(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with each fully replicated multi-device array replaced by one replica (only in
    single-process runs: across processes, Orbax needs the global array)."""
    if jax.process_count() > 1:
        return flat

    def one(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 \
                and x.sharding.is_fully_replicated:
            return x.addressable_shards[0].data
        return x

    return {k: one(v) for k, v in flat.items()}


def _groups(flat: dict[str, Any]) -> list[dict[str, Any]]:
    """``flat`` split by the set of devices its arrays live on (one jitted call each)."""
    groups: dict[tuple[int, ...], dict[str, Any]] = {}
    for k, v in flat.items():
        groups.setdefault(_devices(v), {})[k] = v
    return list(groups.values())


def _copy_and_sum(flat):
    copies = {k: jnp.copy(v) for k, v in flat.items()}
    return copies, _checksums(flat)


_snapshot = jax.jit(_copy_and_sum)


def warm(flat: dict[str, Any], copies: bool) -> None:
    """Compile (by running them once on ``flat``) the jitted calls a save makes, so that the
    first save dispatches through jax's cached fast path instead of compiling."""
    jax.block_until_ready(Checksums(flat, copies).resolve())


class Checksums:
    """Checksums of ``flat``'s arrays, dispatched now (one jitted call per set of devices),
    read by `resolve` (which blocks until the devices have computed them). With ``copies``,
    the same calls also copy the arrays on their devices (`self.copies`): a snapshot that the
    caller's later steps may not donate away."""

    def __init__(self, flat: dict[str, Any], copies: bool = False):
        self.copies = dict(flat)
        self._pending = []
        for g in _groups(flat):
            if copies:
                snap, sums = _snapshot(g)
                self.copies.update(snap)
            else:
                sums = _checksums(g)
            self._pending.append(sums)

    def resolve(self) -> dict[str, list[int]]:
        sums = jax.device_get(self._pending)
        return {k: [int(v) for v in np.asarray(s)] for g in sums for k, s in g.items()}


class Worker:
    """One daemon thread that runs submitted calls in order (Orbax's blocking part of a save,
    off the training thread). `wait` blocks until it is idle and re-raises a call's error."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-save", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            fn = self._queue.get()
            if fn is None:  # close()
                self._queue.task_done()
                return
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller at wait()
                self._error = e
            finally:
                fn = None  # drop the save's arguments (its device copies) now
                self._queue.task_done()

    def submit(self, fn) -> None:
        self._queue.put(fn)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def wait(self, raise_error: bool = True) -> None:
        self._queue.join()
        if raise_error and self._error is not None:
            error, self._error = self._error, None
            raise error


class Deferred:
    """The metadata item's JSON, with the checksums still to be filled into ``custom``."""

    def __init__(self, item: dict, custom: dict, checksums: Checksums):
        self.item, self.custom, self.checksums = item, custom, checksums

    def resolve(self) -> dict:
        self.custom["checksums"] = self.checksums.resolve()
        return self.item


class MetadataHandler(ocp.JsonCheckpointHandler):
    """Orbax's JSON handler (same file, same restore) that first resolves a `Deferred` item,
    in the commit thread. It records itself as Orbax's JSON handler, so that plain Orbax reads
    the step as before."""

    @classmethod
    def typestr(cls) -> str:
        return ocp.JsonCheckpointHandler.typestr()

    async def _save_fn(self, x, directory):
        if isinstance(x, Deferred):
            x = x.resolve()
        await super()._save_fn(x, directory)
