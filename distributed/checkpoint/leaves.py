"""Leaf helpers shared by the checkpoint formats: typed PRNG keys and plain-JSON values."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
from typing import Any

import jax
import numpy as np


def is_key(x: Any) -> bool:
    """Whether `x` (an array or `jax.ShapeDtypeStruct`) is a typed PRNG key array."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def key_impl(x: jax.Array | jax.ShapeDtypeStruct) -> str:
    """The PRNG implementation name of a typed key array or its abstract value."""
    if isinstance(x, jax.Array):
        return str(jax.random.key_impl(x))
    found: list[str] = []
    jax.eval_shape(lambda k: found.append(str(jax.random.key_impl(k))), x)
    return found[0]


def jsonable(x: Any) -> Any:
    """Plain, strict JSON version of `x`: dataclasses to dicts, arrays and numpy scalars to
    lists and numbers, non-finite floats (NaN, inf) to ``None``."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, enum.Enum):
        return jsonable(x.value)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return jsonable(np.asarray(x).tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
