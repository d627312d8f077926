"""Host-side metric writers: `MetricsWriter` protocol (`write(step, metrics)`, `close()`),
`JsonlWriter`, `TensorBoardWriter`, `MultiWriter`.

Writers do not check `jax.process_index()`; the caller creates them on process 0 only. Each
`write` does one `jax.device_get` of the whole dict.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
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


_PERF = ("samples_per_sec", "steps_per_sec")


def tag(name: str) -> str:
    """The grouped name of a metric: ``val/<metric>`` for ``val_*``, ``perf/<metric>`` for
    throughput and the goodput ledger (``goodput/...``), ``train/<metric>`` for the rest
    (``train_loss`` -> ``train/epoch_loss``: the per-epoch mean, beside the per-step ``loss``).
    A name that is already grouped (contains ``/``, e.g. a nested ``val`` dict) is kept."""
    if name.startswith("goodput/"):
        return f"perf/{name.removeprefix('goodput/')}"
    if "/" in name:
        return name
    if name.startswith("val_"):
        return f"val/{name[4:]}"
    if name in _PERF:
        return f"perf/{name}"
    if name.startswith("train_"):
        return f"train/epoch_{name[6:]}"
    return f"train/{name}"


class TensorBoardWriter(_WriterBase):
    """TensorBoard scalars via `tensorboardX` (install `jax-bcd-distributed[tensorboard]`).

    Every numeric scalar becomes `add_scalar(tag(name), value, step)` (grouped: `train/...`,
    `val/...`, `perf/...`); nested dicts become `outer/inner` names first; strings and
    non-scalar arrays are skipped.
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
        for name, value in _flatten_scalars(_host(metrics)):
            self._w.add_scalar(tag(name), value, int(step))
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


def _artifacts_beside(tracking_uri: str) -> str | None:
    """For a local SQLite store, keep artifacts in ``mlartifacts/`` beside the database (else
    MLflow puts them in ``./mlruns`` of whatever folder the run happens to start in)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db = Path(tracking_uri[len(prefix):]).expanduser().resolve()
    return (db.parent / "mlartifacts").as_uri()


class MLflowWriter(_WriterBase):
    """Metrics, parameters, a summary and artifacts in an MLflow tracking store (install the
    `jax-bcd-distributed[mlflow]` extra).

    One MLflow run per writer, in the experiment ``experiment`` (created if missing), through
    an `mlflow.MlflowClient` for ``tracking_uri`` (e.g. ``sqlite:///mlruns.db``): no global
    MLflow state is touched. Metric names are grouped as `tag` says.
    """

    def __init__(self, tracking_uri: str, *, experiment: str = "distributed",
                 run_name: str | None = None, params: Mapping | None = None):
        try:
            from mlflow import MlflowClient
        except ImportError as e:
            raise ImportError("MLflowWriter needs mlflow; install it with "
                              "`pip install 'jax-bcd-distributed[mlflow]'`.") from e
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            experiment, artifact_location=_artifacts_beside(tracking_uri))
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        if params:
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(str(k), str(v)[:6000])
                                                       for k, v in params.items()])

    def write(self, step: int, metrics: Mapping, *, name=tag) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(name(k), value, now, int(step))
                for k, value in _flatten_scalars(_host(metrics)) if math.isfinite(value)]
        if rows:
            self.client.log_batch(self.run_id, metrics=rows)

    def log_summary(self, summary: Mapping) -> None:
        """The run's final numbers as ``summary/<name>`` metrics (nested dicts flattened)."""
        self.write(int(summary.get("final_step", 0) or 0), summary,
                   name=lambda k: f"summary/{k}")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy the file ``path`` into the run's artifacts (under ``artifact_path``)."""
        self.client.log_artifact(self.run_id, os.fspath(path), artifact_path=artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
            self.run_id = None


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
