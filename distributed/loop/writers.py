"""Host-side metric writers: `MetricsWriter` protocol (`write(step, metrics)`, `close()`),
`JsonlWriter`, `TensorBoardWriter`, `MultiWriter`.

Writers do not check `jax.process_index()`; the caller creates them on process 0 only. Each
`write` does one `jax.device_get` of the whole dict.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

from ..core.metrics import host_values as _host


@runtime_checkable
class MetricsWriter(Protocol):
    """Host-side sink for metrics, called only at log steps."""

    def write(self, step: int, metrics: Mapping) -> None: ...

    def close(self) -> None: ...


class _WriterBase:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _to_json(v):
    """numpy/jax scalars -> float/int/bool, arrays -> lists, non-finite floats -> None."""
    if isinstance(v, Mapping):
        return {str(k): _to_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    if isinstance(v, (str, type(None))):
        return v
    if isinstance(v, (np.ndarray, np.generic)):
        return _to_json(v.tolist())
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    raise TypeError(
        f"metric value of type {type(v).__name__} is not JSON-serialisable; "
        "log numbers, strings or arrays."
    )


class JsonlWriter(_WriterBase):
    """Append one JSON object per `write` to `path`: `{"step": step, **metrics}`.

    Values are converted to plain JSON (numpy/jax scalars to numbers, arrays to lists);
    NaN and ±inf are written as `null` so every line is strict JSON. Flushed after each line.
    Parent directories are created; a symlink at ``path`` is refused (`OSError`, ``ELOOP``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self._f = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping) -> None:
        record = {"step": int(step), **_to_json(_host(metrics))}
        self._f.write(json.dumps(record, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class TensorBoardWriter(_WriterBase):
    """TensorBoard scalars via `tensorboardX` (install `jax-bcd-distributed[tensorboard]`).

    Every numeric scalar becomes `add_scalar(name, value, step)`; nested dicts become
    `outer/inner` tags; strings and non-scalar arrays are skipped.
    """

    def __init__(self, logdir: str | os.PathLike):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoardWriter needs tensorboardX; install it with "
                "`pip install 'jax-bcd-distributed[tensorboard]'` (or `pip install tensorboardX`),"
                " or use JsonlWriter."
            ) from e
        self.logdir = os.fspath(logdir)
        self._w = SummaryWriter(logdir=self.logdir)

    def write(self, step: int, metrics: Mapping) -> None:
        for tag, value in _flatten_scalars(_host(metrics)):
            self._w.add_scalar(tag, value, int(step))
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def _flatten_scalars(metrics: Mapping, prefix: str = ""):
    for k, v in metrics.items():
        tag = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten_scalars(v, tag + "/")
        elif isinstance(v, (bool, int, float, np.generic, np.ndarray)) and np.size(v) == 1:
            if not isinstance(v, str) and np.asarray(v).dtype.kind in "biuf":
                yield tag, float(np.asarray(v).reshape(()))


class MultiWriter(_WriterBase):
    """Forward each `write` and `close` to several writers, in order."""

    def __init__(self, writers: Iterable[MetricsWriter]):
        self.writers = list(writers)
        for w in self.writers:
            if not isinstance(w, MetricsWriter):
                raise TypeError(
                    f"MultiWriter needs objects with write(step, metrics) and "
                    f"close(), got {type(w).__name__}."
                )

    def write(self, step: int, metrics: Mapping) -> None:
        for w in self.writers:
            w.write(step, metrics)

    def close(self) -> None:
        for w in self.writers:
            w.close()
