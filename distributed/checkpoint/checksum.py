"""Checksums of saved arrays, computed on the devices where the arrays live.

Each array's bits, read as unsigned 32-bit words ``w_i`` (16- and 8-bit types widened), give two
sums modulo 2**32: ``s1 = sum_i w_i`` and ``s2 = sum_i (i + 1) * w_i`` with ``i`` the element's
row-major index (a Fletcher-style pair: a flipped bit changes ``s1``, a swap of two elements
changes ``s2``). Integer sums do not depend on the order of addition, so the checksum of an
array is the same on every mesh and device count: a checkpoint written on 8 devices verifies on
1. The positional index is built from iotas in the array's own shape, so no array is reshaped
or gathered.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_U32 = jnp.uint32


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words, shape ``x.shape`` (+ a trailing axis of 2 for 64-bit
    types)."""
    if x.dtype == jnp.bool_:
        return x.astype(_U32)
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:
        return jax.lax.bitcast_convert_type(x, _U32)
    narrow = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, narrow).astype(_U32)


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index + 1, as uint32 (wrapping), without reshaping."""
    pos = jnp.ones(shape, _U32)
    stride = 1
    for d in reversed(range(len(shape))):
        pos = pos + jax.lax.broadcasted_iota(_U32, shape, d) * _U32(stride % 2**32)
        stride *= shape[d]
    return pos


def _pair(x: jax.Array) -> jax.Array:
    w = _words(x)
    return jnp.stack([jnp.sum(w, dtype=_U32), jnp.sum(w * _position(w.shape), dtype=_U32)])


_checksums = jax.jit(lambda flat: {k: _pair(v) for k, v in flat.items()})


def _devices(x: Any) -> tuple[int, ...]:
    return tuple(sorted(d.id for d in x.sharding.device_set)) if isinstance(x, jax.Array) else ()


def array_checksums(flat: dict[str, Any]) -> dict[str, list[int]]:
    """``{name: [s1, s2]}`` of every array in ``flat`` (see the module docstring). One jitted
    dispatch per set of devices the arrays live on; blocks until the arrays are computed."""
    groups: dict[tuple[int, ...], dict[str, Any]] = {}
    for k, v in flat.items():
        groups.setdefault(_devices(v), {})[k] = v
    sums = jax.device_get([_checksums(g) for g in groups.values()])
    return {k: [int(v) for v in np.asarray(s)] for g in sums for k, s in g.items()}


def mismatches(recorded: dict[str, list[int]], flat: dict[str, Any]) -> list[str]:
    """Names of the arrays of ``flat`` whose checksum differs from ``recorded`` (arrays without
    a recorded checksum are not checked)."""
    names = {k: v for k, v in flat.items() if k in recorded}
    got = array_checksums(names)
    return sorted(k for k in names if got[k] != list(recorded[k]))
