"""Metric functions and in-jit reductions.

- Host metrics (numpy): `compute_metrics` (RMSE, MAE, MAPE in percent, R², per-output RMSE),
  `print_metrics`, `Metrics`, `average_metrics`, `format_metrics`.
- In-jit helpers: `tree_norm`, `tree_all_finite` (return device scalars; read them only at
  log steps).

Metric *writers* (JSONL, TensorBoard, MLflow) live in `distributed.loop.writers`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

# ---------------------------------------------------------------- host metrics


def host_values(mapping: Mapping) -> dict:
    """One `jax.device_get` for all values, keeping the mapping's key order."""
    keys = list(mapping)
    return dict(zip(keys, jax.device_get([mapping[k] for k in keys]), strict=True))


def compute_metrics(y_true, y_pred, output_names: Sequence[str] | None = None, epsilon=1e-8):
    """Regression metrics on the host.

    Args:
        y_true: targets, shape `(N,)` or `(N, K)`.
        y_pred: predictions, same shape.
        output_names: names of the `K` outputs (default `"0"`, `"1"`, ...).
        epsilon: floor on `|y_true|` in the MAPE denominator.

    Returns:
        A dict of numpy floats: `rmse`, `mae`, `mape` (**percent**: `100 * mean(|e| /
        max(|y|, eps))`), `r2` (for 2-D targets the uniform average of per-output R², as
        scikit-learn; a constant target gives 1.0 if predicted exactly, else 0.0) and
        `per_output_rmse` (dict name -> RMSE; always present, one entry for 1-D targets).

    Raises:
        ValueError: shapes differ, are not 1-D/2-D, or `output_names` has the wrong length.
    """
    yt = np.asarray(jax.device_get(y_true), dtype=np.float64)
    yp = np.asarray(jax.device_get(y_pred), dtype=np.float64)
    if yt.shape != yp.shape or yt.ndim not in (1, 2) or yt.shape[0] == 0:
        raise ValueError(
            f"compute_metrics needs y_true and y_pred of equal non-empty (N,) or "
            f"(N, K) shape, got {yt.shape} and {yp.shape}."
        )
    yt2, yp2 = (yt[:, None], yp[:, None]) if yt.ndim == 1 else (yt, yp)
    k = yt2.shape[1]
    names = [str(i) for i in range(k)] if output_names is None else [str(n) for n in output_names]
    if len(names) != k:
        raise ValueError(
            f"output_names has {len(names)} names but the targets have {k} outputs: {list(names)}."
        )
    err = yp2 - yt2
    ss_res = np.sum(err**2, axis=0)
    ss_tot = np.sum((yt2 - yt2.mean(axis=0)) ** 2, axis=0)
    safe_tot = np.where(ss_tot > 0, ss_tot, 1.0)
    r2 = np.where(ss_tot > 0, 1.0 - ss_res / safe_tot, np.where(ss_res == 0, 1.0, 0.0))
    per_rmse = np.sqrt(np.mean(err**2, axis=0))
    return {
        "rmse": np.float64(np.sqrt(np.mean(err**2))),
        "mae": np.float64(np.mean(np.abs(err))),
        "mape": np.float64(100.0 * np.mean(np.abs(err) / np.maximum(np.abs(yt2), epsilon))),
        "r2": np.float64(np.mean(r2)),
        "per_output_rmse": {n: np.float64(v) for n, v in zip(names, per_rmse, strict=True)},
    }


def print_metrics(metrics: Mapping) -> None:
    """Print `RMSE: 0.0100`, `MAE:  0.0100`, `MAPE: 1.11%`, `R²:   0.9400` (keys present)."""
    if "rmse" in metrics:
        print(f"RMSE: {float(metrics['rmse']):.4f}")
    if "mae" in metrics:
        print(f"MAE:  {float(metrics['mae']):.4f}")
    if "mape" in metrics:
        print(f"MAPE: {float(metrics['mape']):.2f}%")
    if "r2" in metrics:
        print(f"R²:   {float(metrics['r2']):.4f}")


@dataclasses.dataclass
class Metrics:
    """A bag of named scalar metrics (beagle's `Metrics(values={'loss': 1.0})`)."""

    values: dict[str, float] = dataclasses.field(default_factory=dict)


def average_metrics(metrics_list: Sequence[Metrics | Mapping]) -> Metrics | dict:
    """Mean per key over a list of `Metrics` or dicts (a key missing in some entries is averaged
    over the entries that have it). Returns `Metrics` if the first entry is one, else a dict.

    Raises:
        ValueError: the list is empty.
        TypeError: an entry is neither `Metrics` nor a mapping.
    """
    metrics_list = list(metrics_list)
    if not metrics_list:
        raise ValueError("average_metrics got an empty list; pass at least one Metrics/dict.")
    sums: dict[str, list[float]] = {}
    for m in metrics_list:
        if isinstance(m, Metrics):
            m = m.values
        if not isinstance(m, Mapping):
            raise TypeError(
                f"average_metrics entries must be Metrics or dicts, got {type(m).__name__}."
            )
        for key, v in host_values(m).items():
            sums.setdefault(key, []).append(float(np.mean(v)))
    out = {key: float(np.mean(vs)) for key, vs in sums.items()}
    return Metrics(values=out) if isinstance(metrics_list[0], Metrics) else out


def format_metrics(metrics: Metrics | Mapping) -> str:
    """`"loss: 1.5000 | acc: 0.9000"`: insertion order, 4 decimals, joined by `" | "`."""
    values = metrics.values if isinstance(metrics, Metrics) else metrics
    return " | ".join(f"{k}: {float(np.mean(v)):.4f}" for k, v in host_values(values).items())


# ---------------------------------------------------------------- in-jit helpers


def _inexact_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if eqx.is_inexact_array(x)]


def tree_norm(tree) -> jax.Array:
    """Global L2 norm of the floating arrays of a pytree (None and non-array leaves ignored)."""
    leaves = _inexact_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return optax.tree.norm(leaves)


def tree_all_finite(tree) -> jax.Array:
    """Boolean scalar: every element of every floating array is finite (True if none)."""
    leaves = _inexact_leaves(tree)
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
