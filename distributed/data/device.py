"""Host batches -> global `jax.Array`s on the mesh, and a device prefetcher whose position is
checkpointable."""

from __future__ import annotations

import collections
import copy
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from ..core.mesh import BATCH_AXES
from ..core.sharding import batch_sharding
from .sources import DataError


def _present_axes(mesh: Mesh, batch_axes: Sequence[str]) -> tuple[str, ...]:
    return tuple(a for a in batch_axes if a in mesh.axis_names)


def to_global(
    host_batch: Mapping[str, Any], mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES
) -> dict[str, jax.Array]:
    """Turns this process's host batch into global `jax.Array`s sharded by `batch_sharding`.

    Uses `jax.make_array_from_process_local_data`: the global batch is the host batches of all
    processes concatenated in process order (the order `make_dataset` produces, given a mesh whose
    batch axes list devices process by process, as `jax.make_mesh` does).
    """
    sharding = batch_sharding(mesh, batch_axes)
    axes = _present_axes(mesh, batch_axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    n_proc = len({d.process_index for d in mesh.devices.flat})
    out = {}
    for name, value in host_batch.items():
        arr = np.asarray(value)
        rows = arr.shape[0] * n_proc if arr.ndim else 0
        if arr.ndim == 0 or rows % shards:
            raise DataError(
                f"batch array {name!r} has shape {arr.shape} on this process ({rows} rows over "
                f"{n_proc} process(es)), not divisible by the {shards} batch shards of the mesh "
                f"{dict(mesh.shape)}; use a global batch size that is a multiple of {shards}."
            )
        out[name] = jax.make_array_from_process_local_data(sharding, arr)
    return out


class DevicePrefetcher(grain.DatasetIterator):
    """Keeps the next `size` global batches already on the devices, with checkpointable position.

    Wraps an iterator of host batches (normally `iter(make_dataset(...))`), calling `to_global`
    ahead of the consumer; JAX transfers asynchronously, so the step never waits on the copy.

    Because it reads ahead, the wrapped iterator's state is *ahead* of the consumer. Each buffered
    batch is therefore stored with the state read right after it, and `get_state()` returns the
    state as of the last batch handed out (before any: the state at construction); `set_state()`
    drops the buffer and repositions the wrapped iterator. It is a `grain.DatasetIterator`, so
    `grain.checkpoint.CheckpointSave(prefetcher)` / `CheckpointRestore(prefetcher)` work as for the
    plain iterator.

    `wait_s` accumulates the seconds the consumer spent blocked in `__next__` (input stalls, for a
    goodput ledger); `batches_out` counts batches handed out.
    """

    def __init__(
        self,
        iterator: Iterable[Mapping[str, Any]],
        mesh: Mesh,
        size: int = 2,
        *,
        batch_axes: Sequence[str] = BATCH_AXES,
    ):
        it = iter(iterator)
        super().__init__(it if isinstance(it, grain.DatasetIterator) else ())
        if size < 1:
            raise ValueError(f"DevicePrefetcher size must be >= 1, got {size}.")
        self._it: Iterator[Mapping[str, Any]] = it
        self.mesh, self.size, self.batch_axes = mesh, size, tuple(batch_axes)
        self._buffer: collections.deque = collections.deque()
        self._state = self._read_state()
        self.wait_s = 0.0
        self.batches_out = 0

    def _read_state(self) -> Any:
        get = getattr(self._it, "get_state", None)
        return copy.deepcopy(get()) if get is not None else None

    def _fill(self) -> None:
        while len(self._buffer) < self.size:
            try:
                host = next(self._it)
            except StopIteration:
                return
            batch = to_global(host, self.mesh, self.batch_axes)
            self._buffer.append((batch, self._read_state()))

    def __next__(self) -> dict[str, jax.Array]:
        t0 = time.perf_counter()
        try:
            if not self._buffer:
                self._fill()
            if not self._buffer:
                raise StopIteration
            batch, self._state = self._buffer.popleft()
            self._fill()  # dispatch the transfers of the following batches now
            self.batches_out += 1
            return batch
        finally:
            self.wait_s += time.perf_counter() - t0

    def get_state(self) -> dict[str, Any]:
        if self._state is None:
            raise TypeError(
                f"the wrapped iterator {type(self._it).__name__} has no get_state(); wrap "
                "iter(make_dataset(...)) to get a checkpointable position."
            )
        return copy.deepcopy(self._state)

    def set_state(self, state: dict[str, Any]) -> None:
        if not hasattr(self._it, "set_state"):
            raise TypeError(f"the wrapped iterator {type(self._it).__name__} has no set_state().")
        self._buffer.clear()
        self._it.set_state(state)
        self._state = copy.deepcopy(state)

    def close(self) -> None:
        self._buffer.clear()
        super().close()

    def __str__(self) -> str:
        return f"DevicePrefetcher(size={self.size})"
