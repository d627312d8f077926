"""The data forms `Trainer` accepts: ``(x, y[, w])``, ``{"x", "y"[, "weights"]}``, an iterable
of such batches, or seed 003's samples with ``.x`` / ``.y``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

_WEIGHT_KEYS = ("weights", "sample_weight", "w")


def _from_dict(d: Mapping) -> dict[str, np.ndarray]:
    if "x" not in d or "y" not in d:
        raise ValueError(f"data dicts need keys 'x' and 'y' (optional 'weights'); got {sorted(d)}.")
    out = {"x": d["x"], "y": d["y"]}
    for k in _WEIGHT_KEYS:
        if k in d and d[k] is not None:
            out["weights"] = d[k]
    return out


def _is_array(a: Any) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def as_arrays(data: Any, what: str) -> dict[str, np.ndarray] | None:
    """``(x, y[, w])``, ``{"x", "y"[, "weights"]}``, an iterable of such batches, or of samples
    with ``.x`` / ``.y`` attributes -> ``{"x", "y"[, "weights"]}`` float32 numpy arrays."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        out = _from_dict(data)
    elif isinstance(data, (tuple, list)) and len(data) in (2, 3) and _is_array(data[0]) \
            and _is_array(data[1]) and len(data[0]) == len(data[1]):
        out = dict(zip(("x", "y", "weights"), data, strict=False))
        if out.get("weights") is None:
            out.pop("weights", None)
    else:
        try:
            items = list(data() if callable(data) else data)
        except TypeError:
            raise ValueError(f"{what} must be (x, y), a dict with 'x' and 'y', or an iterable of "
                             f"(x, y) batches; got {type(data).__name__}.") from None
        if not items:
            raise ValueError(f"{what} is empty.")
        if hasattr(items[0], "x") and hasattr(items[0], "y"):  # seed 003's samples
            out = {"x": np.vstack([np.asarray(s.x) for s in items]),
                   "y": np.vstack([np.atleast_1d(np.asarray(s.y)) for s in items])}
        else:
            batches = [_from_dict(b) if isinstance(b, Mapping) else
                       dict(zip(("x", "y", "weights"), b, strict=False)) for b in items]
            out = {k: np.concatenate([np.asarray(jax.device_get(b[k])) for b in batches])
                   for k in batches[0] if batches[0][k] is not None}
    out = {k: np.asarray(jax.device_get(v), np.float32) for k, v in out.items()}
    n = len(out["x"])
    for k, v in out.items():
        if v.ndim == 0 or len(v) != n:
            raise ValueError(f"{what}: '{k}' has shape {v.shape}; every array needs the same "
                             f"number of examples as x ({n}).")
    if "weights" in out and out["weights"].ndim != 1:
        raise ValueError(f"{what}: sample weights must have shape ({n},), got "
                         f"{out['weights'].shape}.")
    return out


# ------------------------------------------------------------------------------- callbacks
