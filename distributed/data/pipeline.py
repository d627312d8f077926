"""The input pipeline: deterministic, per-process sharded Grain datasets of global batches.

Iteration semantics (every function here follows them):

- Epoch ``e`` orders the examples ``0..N-1`` by one permutation drawn from ``(seed, e)``
  (`epoch_permutation`, ``jax.random.permutation``; the identity without shuffling): a new
  order every epoch, the same on every process and on the devices.
- The epochs' orders, one after the other, form one *stream* of examples; global batch ``k``
  (counted from 0 over the whole run) is stream positions ``[k*B, (k+1)*B)``. No example is ever
  dropped: when ``B`` does not divide ``N``, an epoch's last rows share a batch with the first
  rows of the next epoch (`distributed.core.clock.EpochClock` says where epochs end).
- Process ``p`` of ``P`` reads the contiguous slice ``[p*B/P, (p+1)*B/P)`` of global batch ``k``,
  so the host batches of all processes, concatenated in process order, are exactly the global
  batch — the same examples whatever ``P`` is. `to_global` assembles that global `jax.Array`.
- The iterator's checkpointable state is grain's ``{"next_index": k}``: the number of batches
  consumed, which is the same on every process and independent of ``P``.

Each batch is one gather of whole rows from the source (one `np.take` per array for in-memory
data): the cost per example is that of copying it, shuffled or not.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..core.clock import EpochClock
from ..core.mesh import check_batch_size
from .sources import ArrayRecordSource, ArraySource, DataError, open_source

__all__ = ["epoch_key", "epoch_permutation", "make_dataset", "epoch_batches", "BatchIndices"]


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _cpu() -> jax.Device:
    return jax.local_devices(backend="cpu")[0]


# Epoch orders are drawn a block of epochs per call (one dispatch and one host copy for many
# small epochs: for 512 examples a call per epoch cost more than the epoch's batches' gathers)
_BLOCK_ELEMENTS = 1 << 16  # (a block costs at most a few epochs of large N ahead of time)


def _epochs_per_block(n: int) -> int:
    return max(1, min(64, _BLOCK_ELEMENTS // max(n, 1)))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _permutations(root: jax.Array, first_epoch: jax.Array, count: int, n: int) -> jax.Array:
    """``(count, n)``: epochs ``first_epoch ..``'s orders, each `jax.random.permutation` of
    `fold_in(root, epoch)` (= `epoch_key`; vmapped: the same values as one call per epoch)."""
    epochs = first_epoch + jnp.arange(count)
    return jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(root, e), n))(epochs)


@functools.lru_cache(maxsize=2)
def _permutation_block(seed: int, block: int, n: int) -> np.ndarray:
    count = _epochs_per_block(n)
    with jax.default_device(_cpu()):
        out = np.asarray(_permutations(jax.random.key(seed), block * count, count, n))
        out = out.astype(np.int64)
    out.flags.writeable = False
    return out


def _ahead(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s order from its block (for a stream that goes on to the next epochs)."""
    count = _epochs_per_block(n)
    return _permutation_block(seed, epoch // count, n)[epoch % count]


@functools.lru_cache(maxsize=4)
def _one(seed: int, epoch: int, n: int) -> np.ndarray:
    """Epoch ``epoch``'s order alone (for callers that draw one epoch per seed)."""
    with jax.default_device(_cpu()):
        out = np.asarray(jax.random.permutation(epoch_key(seed, epoch), n)).astype(np.int64)
    out.flags.writeable = False
    return out


def epoch_key(seed: int, epoch: Any) -> jax.Array:
    """The PRNG key of epoch ``epoch``'s order: ``fold_in(key(seed), epoch)`` (jit-safe)."""
    return jax.random.fold_in(jax.random.key(seed), epoch)


def epoch_permutation(seed: int, epoch: int, n: int, shuffle: bool = True) -> np.ndarray:
    """The order of the ``n`` examples in epoch ``epoch``: ``jax.random.permutation`` of
    `epoch_key` (computed on the host's CPU device, cached), or ``arange(n)`` without shuffling.

    A device that draws ``jax.random.permutation(epoch_key(seed, e), n)`` inside a jitted
    function gets the same order, so device-resident input and this host pipeline feed the same
    batches. Read-only int64 array of shape ``(n,)``.
    """
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return _one(_check_seed(seed), int(epoch), int(n))


class BatchIndices(Sequence):
    """Global batch ``k`` -> the example indices of stream positions ``[k*B, (k+1)*B)``.

    A random-access sequence (Grain reads it as a `grain.MapDataset` source) of length
    ``EpochClock(n, B).steps(num_epochs)``, or unbounded (``sys.maxsize``) when ``num_epochs``
    is None.
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None):
        self.clock = EpochClock(num_examples, batch_size)
        self.seed, self.shuffle = _check_seed(seed), bool(shuffle)
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}.")
        self._len = sys.maxsize if num_epochs is None else self.clock.steps(num_epochs)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self._len:
            raise IndexError(f"batch {k} is outside [0, {self._len}).")
        n, b = self.clock.num_examples, self.clock.batch_size
        start, stop = k * b, (k + 1) * b
        parts = []
        for e in range(start // n, (stop - 1) // n + 1):
            perm = _ahead(self.seed, e, n) if self.shuffle else np.arange(n, dtype=np.int64)
            parts.append(perm[max(start - e * n, 0):min(stop - e * n, n)])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


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


def _host_batches(source: Any, *, global_batch_size: int, seed: int, shuffle: bool,
                  num_epochs: int | None, process_index: int | None, process_count: int | None,
                  mesh: Mesh | None, source_kwargs: Mapping[str, Any]
                  ) -> tuple[grain.MapDataset, ArraySource]:
    p, n_proc = _resolve_processes(process_index, process_count)
    src = open_source(source, **source_kwargs)
    try:
        check_batch_size(global_batch_size, mesh, n_proc, num_examples=len(src))
    except ValueError as e:
        raise DataError(str(e)) from None
    idx = BatchIndices(len(src), global_batch_size, seed=seed, shuffle=shuffle,
                       num_epochs=num_epochs)
    return grain.MapDataset.source(idx).map(_ProcessSlice(p, n_proc)).map(src.gather), src


def make_dataset(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    num_threads: int | None = None,
    prefetch_buffer: int = 4,
    mesh: Mesh | None = None,
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
    - `seed`, `shuffle`: per-epoch order (deterministic in `(seed, epoch)`).
    - `num_epochs`: `None` repeats forever, otherwise stops after the batches that complete
      that many epochs (`EpochClock.steps(num_epochs)`; every batch is full).
    - `process_index`, `process_count`: default to `jax.process_index()` / `jax.process_count()`.
    - `worker_count`: `> 0` adds `mp_prefetch` with that many worker processes (the order is
      unchanged; the iterator state then has grain's multi-worker format). Grain's workers read
      absl flags: outside an absl program, parse them first (e.g. ``absl.flags.FLAGS([""])``).
    - `num_threads`, `prefetch_buffer`: grain `ReadOptions` (threads reading batches ahead and the
      number of host batches buffered); `num_threads=None` means 1 in memory, 4 for ArrayRecord.
    - `mesh`: if given, also check the batch divides its batch shards.

    **Returns:** a `grain.IterDataset`; `iter()` of it is a `grain.DatasetIterator` whose
    `get_state()` is `{"next_index": k}` (JSON-serialisable) and whose `set_state()` resumes.

    **Raises:** `DataError` for bad data or a batch size that does not fit.
    """
    ds, src = _host_batches(
        source, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
        num_epochs=num_epochs, process_index=process_index, process_count=process_count,
        mesh=mesh, source_kwargs=dict(keys=keys, expected_shapes=expected_shapes,
                                      float_keys=float_keys),
    )
    if num_threads is None:
        num_threads = 4 if isinstance(src, ArrayRecordSource) else 1
    out = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer)
    )
    if worker_count > 0:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return out


def epoch_batches(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    **source_kwargs: Any,
) -> grain.MapDataset:
    """The host batches of epoch ``epoch``: a `grain.MapDataset` (iterable, `len()`, indexable).

    They are batches ``clock.steps(epoch) .. clock.steps(epoch + 1) - 1`` of `make_dataset` with
    the same arguments (``clock = EpochClock(N, global_batch_size)``): the batches that complete
    epoch ``epoch``, whose first may hold rows carried over from the epoch before and whose last
    may hold rows of the next.
    """
    ds, src = _host_batches(
        source, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
        num_epochs=None, process_index=process_index, process_count=process_count, mesh=None,
        source_kwargs=source_kwargs,
    )
    clock = EpochClock(len(src), global_batch_size)
    return ds[clock.steps(epoch):clock.steps(epoch + 1)]

