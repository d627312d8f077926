"""The input pipeline: deterministic, per-process sharded Grain datasets and host → device batches.

Iteration semantics (every function here follows them):

- The examples `0..N-1` are shuffled once per epoch with grain's index shuffle, seeded by
  `(seed, epoch)`: a different permutation every epoch, the same on every process.
- Epoch `e`'s permutation is cut into *global* batches of `global_batch_size` examples
  (`steps_per_epoch = N // global_batch_size`, the remainder of each epoch is dropped unless
  `drop_remainder=False`). Batches never straddle an epoch boundary.
- Global batch `k` (counted from 0 over all epochs) belongs to epoch `k // steps_per_epoch`.
  Process `p` of `P` reads the contiguous slice `[p*B/P, (p+1)*B/P)` of global batch `k`, so the
  host batches of all processes, concatenated in process order, are exactly the global batch —
  the same examples whatever `P` is. `to_global` assembles that global `jax.Array`.
- The iterator's checkpointable state is grain's `{"next_index": k}`: the number of batches
  consumed, which is the same on every process and independent of `P`.
"""

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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .data_sources import (
    ArrayRecordSource,
    ArraySource,
    DataError,
    InMemorySource,
    load_arrays,
    open_source,
    split_arrays,
    validate_arrays,
    write_array_record,
)

__all__ = [
    "BATCH_AXES",
    "DataError",
    "ArraySource",
    "InMemorySource",
    "ArrayRecordSource",
    "open_source",
    "load_arrays",
    "validate_arrays",
    "write_array_record",
    "split_arrays",
    "check_batch_size",
    "steps_per_epoch",
    "make_dataset",
    "epoch_batches",
    "batch_sharding",
    "to_global",
    "DevicePrefetcher",
]

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
"""Mesh axes the batch dimension is split over (those absent from a mesh are skipped)."""


def _present_axes(mesh: Mesh, batch_axes: Sequence[str]) -> tuple[str, ...]:
    return tuple(a for a in batch_axes if a in mesh.axis_names)


def check_batch_size(
    global_batch_size: int,
    *,
    num_examples: int | None = None,
    process_count: int = 1,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_AXES,
    drop_remainder: bool = True,
) -> None:
    """Raises `DataError` unless `global_batch_size` is positive, divisible by `process_count`
    and by the number of batch shards of `mesh` (the product of its `batch_axes` sizes), and —
    with `drop_remainder` — no larger than `num_examples`."""
    b = global_batch_size
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0:
        raise DataError(f"global batch size must be a positive integer, got {b!r}.")
    if b % process_count:
        raise DataError(
            f"global batch size {b} is not divisible by the process count {process_count}; "
            f"use a multiple of {process_count}."
        )
    if mesh is not None:
        axes = _present_axes(mesh, batch_axes)
        shards = math.prod(mesh.shape[a] for a in axes)
        if b % shards:
            sizes = " × ".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise DataError(
                f"global batch size {b} is not divisible by the {shards} batch shards of the mesh "
                f"({sizes}); use a multiple of {shards}."
            )
    if num_examples is not None and drop_remainder and b > num_examples:
        raise DataError(
            f"global batch size {b} is larger than the dataset ({num_examples} examples), so no "
            f"full batch exists; use a batch size of at most {num_examples}."
        )


def steps_per_epoch(num_examples: int, global_batch_size: int, drop_remainder: bool = True) -> int:
    """Global batches per epoch: `N // B`, or `ceil(N / B)` without `drop_remainder`."""
    if drop_remainder:
        return num_examples // global_batch_size
    return -(-num_examples // global_batch_size)


def _grain_seed(seed: int) -> int:
    # Hash the user seed so that (seed, epoch + 1) is unrelated to (seed + 1, epoch): grain uses
    # `seed + epoch` as the per-epoch shuffle seed.
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(np.random.SeedSequence(int(seed)).generate_state(1, np.uint32)[0])


class _ProcessSlice:
    """Global batch of example indices → this process's contiguous share."""

    def __init__(self, process_index: int, process_count: int):
        self.p, self.n = process_index, process_count

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        return np.array_split(idx, self.n)[self.p]


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if n < 1 or not 0 <= p < n:
        raise ValueError(f"need 0 <= process_index < process_count, got {p=} and {n=}.")
    return p, n


def _host_batches(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    num_epochs: int | None,
    process_index: int | None,
    process_count: int | None,
    drop_remainder: bool,
    mesh: Mesh | None,
    batch_axes: Sequence[str],
    source_kwargs: Mapping[str, Any],
) -> tuple[grain.MapDataset, ArraySource]:
    p, n_proc = _resolve_processes(process_index, process_count)
    src = open_source(source, **source_kwargs)
    check_batch_size(
        global_batch_size,
        num_examples=len(src),
        process_count=n_proc,
        mesh=mesh,
        batch_axes=batch_axes,
        drop_remainder=drop_remainder,
    )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}.")
    idx = grain.MapDataset.range(len(src))
    if shuffle:
        idx = idx.shuffle(seed=_grain_seed(seed))
    idx = idx.batch(global_batch_size, drop_remainder=drop_remainder)  # one epoch
    idx = idx.repeat(num_epochs)  # batch k → epoch k // len, reshuffled per epoch
    return idx.map(_ProcessSlice(p, n_proc)).map(src.gather), src


def make_dataset(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    num_threads: int | None = None,
    prefetch_buffer: int = 4,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = BATCH_AXES,
    keys: Sequence[str] | None = None,
    expected_shapes: Mapping[str, Sequence[int | None]] | None = None,
    float_keys: Sequence[str] = (),
) -> grain.IterDataset:
    """A Grain dataset of this process's host batches (see the module docstring for the order).

    **Arguments:**

    - `source`: a dict of arrays, a tuple of arrays (+ `keys`), an `.npz` path, or ArrayRecord
      path(s)/glob (read lazily); validated with `expected_shapes` / `float_keys`.
    - `global_batch_size`: examples per step over all processes; each process gets
      `global_batch_size // process_count`.
    - `seed`, `shuffle`: per-epoch shuffle (deterministic in `(seed, epoch)`).
    - `num_epochs`: `None` repeats forever (the iterator never stops; the epoch of batch `k` is
      `k // steps_per_epoch(...)`), otherwise stops after that many epochs.
    - `process_index`, `process_count`: default to `jax.process_index()` / `jax.process_count()`.
    - `drop_remainder`: drop each epoch's last partial batch. If kept, a partial batch is split
      over processes with `np.array_split`, so it may not be shardable by `to_global`.
    - `worker_count`: `> 0` adds `mp_prefetch` with that many worker processes (the order is
      unchanged; the iterator state then has grain's multi-worker format).
    - `num_threads`, `prefetch_buffer`: grain `ReadOptions` (threads reading batches ahead and the
      number of host batches buffered); `num_threads=None` means 1 in memory, 4 for ArrayRecord.
    - `mesh`, `batch_axes`: if a mesh is given, also check the batch divides its batch shards.

    **Returns:** a `grain.IterDataset`; `iter()` of it is a `grain.DatasetIterator` whose
    `get_state()` is `{"next_index": k}` (JSON-serialisable) and whose `set_state()` resumes.

    **Raises:** `DataError` for bad data or a batch size that does not fit.
    """
    ds, src = _host_batches(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=drop_remainder,
        mesh=mesh,
        batch_axes=batch_axes,
        source_kwargs=dict(keys=keys, expected_shapes=expected_shapes, float_keys=float_keys),
    )
    if num_threads is None:
        num_threads = 4 if isinstance(src, ArrayRecordSource) else 1
    out = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer)
    )
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app
            flags.FLAGS.mark_as_parsed()  # (tests, notebooks) use their defaults
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out


def epoch_batches(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    **source_kwargs: Any,
) -> grain.MapDataset:
    """One epoch of shuffled host batches: a `grain.MapDataset` (iterable, `len()`, indexable).

    Deterministic per `(seed, epoch)`, and identical to batches
    `epoch * steps_per_epoch ... (epoch + 1) * steps_per_epoch - 1` of `make_dataset` with the
    same arguments.
    """
    ds, src = _host_batches(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=None,
        process_index=process_index,
        process_count=process_count,
        drop_remainder=drop_remainder,
        mesh=None,
        batch_axes=BATCH_AXES,
        source_kwargs=source_kwargs,
    )
    spe = steps_per_epoch(len(src), global_batch_size, drop_remainder)
    return ds[epoch * spe : (epoch + 1) * spe]


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """`NamedSharding` splitting dim 0 over the `batch_axes` present in `mesh` (rest replicated)."""
    axes = _present_axes(mesh, batch_axes)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


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
