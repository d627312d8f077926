"""`DeviceData`: the training arrays kept on the devices, and the stream's batches drawn there.

The seeds' datasets are small: they fit in device memory many times over, while a step of a
small model is microseconds of arithmetic behind milliseconds of host work (fetching, copying,
dispatching). `DeviceData` puts the arrays on the mesh once, sharded along the batch axes
(rows padded to a multiple of the batch shards), and draws each global batch on the device:
the same examples, in the same order, as the host pipeline (`distributed.data.pipeline`):

- epoch ``e``'s order is ``jax.random.permutation(epoch_key(seed, e), N)`` (the identity without
  shuffling), drawn on the device once per epoch;
- global batch ``k`` is stream positions ``[k*B, (k+1)*B)`` of the epochs' orders one after the
  other, so an epoch's last batch may carry rows of the next.

A batch is gathered with one ``shard_map``: every batch shard takes the rows it holds, the others
contribute zeros, and a ``psum_scatter`` over the batch axes hands each shard its slice of the
batch (the values move as their bit patterns, so the sum is exact for every dtype). Nothing of
size ``N`` moves per step.

It is also a checkpointable iterator (grain's ``{"next_index": k}``, like `DevicePrefetcher`),
so a loop can take its batches one at a time, and a checkpoint moves between the two inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..core.clock import EpochClock
from ..core.mesh import BATCH_AXES, check_batch_size
from .pipeline import epoch_key

# Budget for the arrays on one device, as a fraction of its free memory (accelerators), or in
# bytes per process (CPU, whose "devices" share the host's memory).
DEVICE_FRACTION = 0.25
CPU_BYTES = 1 << 30


def _axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.shape)


def _shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in _axes(mesh))


def fits(arrays: Mapping[str, np.ndarray], mesh: Mesh) -> tuple[bool, str]:
    """Whether ``arrays`` fit on ``mesh``'s devices for `DeviceData`, and why (a phrase).

    Sharded over the batch shards, each device holds ``bytes / shards`` of the arrays, plus the
    replicated orders of two epochs (``2N`` int32) and the permutation's sort buffers (taken as
    another ``4N`` bytes); that must stay under `DEVICE_FRACTION` of a device's free memory
    (where the device reports it), or, on CPU, the whole process's share under `CPU_BYTES`.
    """
    total = sum(np.asarray(a).nbytes for a in arrays.values())
    n = len(next(iter(arrays.values()))) if arrays else 0
    per_device = total / _shards(mesh) + 3 * 4 * n
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    try:
        stats = local[0].memory_stats()
    except Exception:  # (not every backend reports it)
        stats = None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        budget = DEVICE_FRACTION * free
        what = f"{per_device / 2**20:.1f} MiB per device of {free / 2**20:.0f} MiB free"
    else:
        per_device, budget = per_device * len(local), CPU_BYTES
        what = f"{per_device / 2**20:.1f} MiB per process, in host memory"
    return per_device <= budget, what


def _as_bits(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits)


def _from_bits(x: jax.Array, dtype: Any) -> jax.Array:
    if dtype == jnp.bool_:
        return x.astype(jnp.bool_)
    return jax.lax.bitcast_convert_type(x, dtype)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How `DeviceData` lays its rows out and draws a batch: everything static about it, and
    hashable, so that a compiled multi-step call can be reused by every engine with the same
    layout (the arrays themselves are arguments).

    Attributes:
        clock: examples ``N`` and global batch size ``B``.
        mesh: the mesh.
        axes: the batch axes the rows are sharded over (empty: one shard, a plain gather).
        rows_per_shard: rows on each batch shard (``N`` padded up to a multiple of the shards).
    """

    clock: EpochClock
    mesh: Mesh
    axes: tuple[str, ...]
    rows_per_shard: int

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(self.axes or None))

    def batch(self, args: Mapping[str, Any], i: Any) -> dict[str, jax.Array]:
        """The ``i``-th batch after `DeviceData.chunk_args` (traceable; ``i`` may be traced).
        Each array ``(B, ...)``, sharded along the batch axes."""
        n, b = self.clock.num_examples, self.clock.batch_size
        pos = args["offset"] + i * b + jnp.arange(b, dtype=jnp.int32)  # within epoch e and e+1
        idx = args["perms"][jnp.clip(pos, 0, 2 * n - 1)]
        return {k: self._gather(x, idx) for k, x in args["arrays"].items()}

    def _gather(self, x: jax.Array, idx: jax.Array) -> jax.Array:
        if not self.axes:
            return jnp.take(x, idx, axis=0)
        rows, axes = self.rows_per_shard, self.axes

        def local(shard, idx):
            j = idx - jax.lax.axis_index(axes) * rows
            mine = (j >= 0) & (j < rows)
            got = _as_bits(jnp.take(shard, jnp.clip(j, 0, rows - 1), axis=0))
            got = jnp.where(mine.reshape(mine.shape + (1,) * (got.ndim - 1)), got, 0)
            return jax.lax.psum_scatter(got, axes, scatter_dimension=0, tiled=True)

        out = jax.shard_map(local, mesh=self.mesh, in_specs=(P(axes), P()),
                            out_specs=P(axes))(x, idx)
        return _from_bits(out, x.dtype)


class DeviceData:
    """The training arrays on the devices; global batches drawn there (see the module docs).

    Args:
        arrays: ``{name: (N, ...) numpy array}`` (all processes pass the same full arrays).
        mesh: the mesh; rows are sharded over its batch axes (``data``, ``fsdp``).
        global_batch_size: examples per step, ``B``.
        seed: the data order's seed (as the host pipeline's).
        shuffle: a new order each epoch (else the rows in order, epoch after epoch).

    Raises:
        ValueError: a batch size that does not fit the data, mesh or processes.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], mesh: Mesh, *, global_batch_size: int,
                 seed: int, shuffle: bool = True):
        lengths = {k: len(v) for k, v in arrays.items()}
        n = next(iter(lengths.values()))
        if len(set(lengths.values())) > 1:
            raise ValueError(f"DeviceData: arrays with different numbers of examples "
                             f"{lengths}; every array needs the same leading axis length.")
        check_batch_size(global_batch_size, mesh, jax.process_count(), num_examples=n)
        self.mesh, self.seed, self.shuffle = mesh, int(seed), bool(shuffle)
        self.clock = EpochClock(n, global_batch_size)
        self.layout = Layout(self.clock, mesh, _axes(mesh) if _shards(mesh) > 1 else (),
                             -(-n // _shards(mesh)))
        self.batch_sharding = rows = self.layout.batch_sharding
        self.arrays = {k: _put_rows(np.asarray(v), self.layout.rows_per_shard * _shards(mesh),
                                    rows) for k, v in arrays.items()}
        self.next_index = 0
        self._perms: tuple[int, Any] | None = None
        self._one = jax.jit(self.layout.batch)

    # -- the checkpointable iterator (one batch per call) -------------------------------------
    def __iter__(self) -> DeviceData:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = self._one(self.chunk_args(self.next_index), 0)
        self.next_index += 1
        return batch

    def advance(self, n: int) -> None:
        """Count ``n`` batches as consumed (drawn on the device by a multi-step call)."""
        self.next_index += int(n)

    def get_state(self) -> dict[str, int]:
        return {"next_index": self.next_index}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.next_index = int(state["next_index"])

    def close(self) -> None:
        pass

    # -- drawing batches on the device --------------------------------------------------------
    def chunk_args(self, start: int) -> dict[str, Any]:
        """The device arguments of the batches from batch index ``start`` on, within the epoch
        of batch ``start`` (the orders of that epoch and the next, and where ``start`` begins
        in them)."""
        e = self.clock.epoch_of(start)
        if self._perms is None or self._perms[0] != e:
            self._perms = (e, self._permutations(e))
        offset = start * self.clock.batch_size - e * self.clock.num_examples
        return {"arrays": self.arrays, "perms": self._perms[1],
                "offset": jnp.asarray(offset, jnp.int32)}

    def _permutations(self, epoch: int) -> jax.Array:
        n = self.clock.num_examples
        if not self.shuffle:
            return jnp.tile(jnp.arange(n, dtype=jnp.int32), 2)
        return _orders(self.seed, epoch, n, NamedSharding(self.mesh, P()))


def _put_rows(x: np.ndarray, padded: int, sharding: NamedSharding) -> jax.Array:
    full = np.zeros((padded,) + x.shape[1:], x.dtype)
    full[:len(x)] = x
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


@functools.partial(jax.jit, static_argnums=(2, 3))
def _orders_jit(k0: jax.Array, k1: jax.Array, n: int, sharding: NamedSharding) -> jax.Array:
    perms = [jax.random.permutation(k, n) for k in (k0, k1)]
    return jax.lax.with_sharding_constraint(jnp.concatenate(perms).astype(jnp.int32), sharding)


def _orders(seed: int, epoch: int, n: int, sharding: NamedSharding) -> jax.Array:
    """Epochs ``epoch`` and ``epoch + 1``'s orders, concatenated: ``(2N,)`` int32, replicated
    (the keys are `epoch_key`'s, as the host pipeline's)."""
    return _orders_jit(epoch_key(seed, epoch), epoch_key(seed, epoch + 1), n, sharding)
