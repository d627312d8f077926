"""`params_sha256`: one fingerprint of every model array, identical on every process."""

from __future__ import annotations

import hashlib
from typing import Any

import equinox as eqx
import jax
import numpy as np


def host_array(x: jax.Array) -> np.ndarray:
    """The full value of ``x`` on this host (gathered across processes if needed)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def params_sha256(tree: Any) -> str:
    """SHA-256 over every array of ``tree`` in tree order: dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        a = np.ascontiguousarray(host_array(leaf))
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def arrays_sha256(arrays: dict[str, Any], max_bytes: int = 1 << 28) -> str:
    """SHA-256 of a data set (``{name: (N, ...) array}``): names, dtypes, shapes and contents.

    Data sets up to ``max_bytes`` are hashed whole; larger ones by an evenly strided sample of
    rows (their shapes and every sampled row still count), so the cost stays bounded.
    """
    h = hashlib.sha256()
    stride = max(1, -(-sum(np.asarray(a).nbytes for a in arrays.values()) // max_bytes))
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a[::stride] if a.ndim else a).tobytes())
    return h.hexdigest()
