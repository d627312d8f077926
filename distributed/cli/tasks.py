"""What the command line trains, per ``--model``: an engine `Task` (model, blocks, optimizers,
loss, data, metrics) plus the held-out report. Plain data; nothing here runs training."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import bcd
from ..core.losses import (
    l1_schedule_rule,
    masked_mse_loss,
    mse_loss,
    total_loss,
    weighted_masked_mse_loss,
)
from ..core.optim import OptimizerConfig, make_optimizer
from ..data import DataError, load_arrays, split_arrays, validate_arrays
from ..engine import Task
from .config import MODELS, TrainConfig, init_seed, is_ensemble

log = logging.getLogger(__name__)

PSF_KEYS = ("positions", "seds", "targets", "masks")
FIELD = (0.0, 1000.0)  # the psf model's field extent in x and y (`PSFFieldModel` x_lims/y_lims)


@dataclasses.dataclass(frozen=True)
class RunTask:
    """A command-line task: the engine `Task`, the report of a trained model against known
    truth (the embedded PSF field's OPDs), and the rows of ``--test_data`` (scored with the
    task's metrics)."""

    task: Task
    report: Callable[[Any], dict[str, float]] = lambda model: {}
    test: dict[str, np.ndarray] | None = None


def _optimizer(cfg: TrainConfig, lr: float, updates: int) -> optax.GradientTransformation:
    """The run's optimizer for one block; its schedule spans that block's ``updates``. With
    ``--sweep`` its learning rate and weight decay live in its state (one per member)."""
    return make_optimizer(OptimizerConfig(
        name=cfg.optimizer, learning_rate=lr, schedule=cfg.schedule,
        warmup_steps=cfg.warmup_steps, total_steps=max(updates, cfg.warmup_steps + 1),
        T0=cfg.scheduler_T0, weight_decay=cfg.weight_decay,
        grad_clip_norm=cfg.grad_clip_norm or None), sweepable=bool(cfg.sweep))


def _model(cfg: TrainConfig, from_key: Callable[[jax.Array], Any]) -> Any:
    """The task's model: ``key -> model`` for an ensemble (member i from key(init seed + i)),
    else the model of ``--init_seed`` (default ``--seed``)."""
    if is_ensemble(cfg):
        return from_key
    return lambda: from_key(jax.random.key(init_seed(cfg)))


def _psf_file(path: str) -> dict[str, np.ndarray]:
    arrays = load_arrays(path, float_keys=PSF_KEYS)
    missing = [k for k in PSF_KEYS if k not in arrays]
    if missing:
        raise DataError(
            f"{path}: the psf model needs arrays {list(PSF_KEYS)} (+ optional 'weights'); "
            f"missing {missing}. Save them with np.savez(path, positions=..., seds=..., "
            f"targets=..., masks=...).")
    arrays.setdefault("weights", np.ones(len(arrays["positions"]), np.float32))
    pos = np.asarray(arrays["positions"])
    if pos.size and (pos.min() < FIELD[0] or pos.max() > FIELD[1]):
        log.warning("%s: positions span [%.4g, %.4g], outside the psf model's field [%g, %g] "
                    "in x and y: the model extrapolates there; rescale the positions into the "
                    "field", path, pos.min(), pos.max(), *FIELD)
    return {k: arrays[k] for k in (*PSF_KEYS, "weights")}


def _splits(cfg: TrainConfig, read: Callable[[str], dict], embedded: Callable[[], dict]
            ) -> dict[str, dict[str, np.ndarray] | None]:
    """Train / val / test rows: ``--data`` (else the embedded data), split ``--val_fraction``
    for validation unless ``--val_data`` is given; ``--test_data`` if given."""
    base = embedded() if not cfg.data else None
    if cfg.data:
        rows = read(cfg.data)
        if cfg.val_data:
            train, val = rows, read(cfg.val_data)
        else:
            train, val = split_arrays(rows, (1 - cfg.val_fraction, cfg.val_fraction), cfg.seed)
    else:
        train, val = base["train"], read(cfg.val_data) if cfg.val_data else base["val"]
    test = read(cfg.test_data) if cfg.test_data else None
    for name, rows in (("--val_data", val), ("--test_data", test)):
        if rows is None:
            continue
        bad = {k: (v.shape[1:], train[k].shape[1:]) for k, v in rows.items()
               if k in train and v.shape[1:] != train[k].shape[1:]}
        if bad or set(rows) != set(train):
            raise DataError(f"{name}: its arrays {sorted(rows)} do not match the training "
                            f"data's {sorted(train)} (shapes {bad}); give the same arrays.")
    return {"train": train, "val": val, "test": test,
            "truth": None if base is None else base.get("truth")}


def _psf_embedded(cfg: TrainConfig) -> dict:
    from ..models import make_star_field

    field = make_star_field(n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                            seed=cfg.seed)
    keep = (*PSF_KEYS, "weights")
    return {"train": {k: field["train"][k] for k in keep},
            "val": {k: field["val"][k] for k in keep}, "truth": field["test"]}


def psf_task(cfg: TrainConfig) -> RunTask:
    from ..models import PSFFieldModel, evaluate_psf

    splits = _splits(cfg, _psf_file, lambda: _psf_embedded(cfg))
    sample = splits["train"]
    n_pix, n_lambda = sample["targets"].shape[-1], sample["seds"].shape[-1]
    kwargs = {} if not cfg.data else {"n_pix": n_pix}
    from_key = lambda key: PSFFieldModel(key=key, **kwargs)  # noqa: E731
    import equinox as eqx

    probe = eqx.filter_eval_shape(from_key, jax.random.key(0))
    if probe.n_pix != n_pix or probe.n_lambda != n_lambda:
        raise DataError(
            f"{cfg.data or 'data'}: targets are {n_pix}x{n_pix} with {n_lambda} SED bins, but the "
            f"psf model makes {probe.n_pix}x{probe.n_pix} images with {probe.n_lambda} bins; "
            f"reshape the data to match."
        )

    def loss_fn(model, batch):
        l1 = jnp.mean(batch["l1_rate"]) if "l1_rate" in batch else 0.0
        return total_loss(model, batch["positions"], batch["seds"], batch["targets"],
                          batch["masks"], sample_weight=batch["weights"],
                          l2_param=cfg.l2_param, l1_rate=l1, as_ratio=True), {}

    def metric_fn(model, batch):
        pred = model(batch["positions"], batch["seds"])
        return {"loss": weighted_masked_mse_loss(pred, batch["targets"], batch["masks"],
                                                 batch["weights"], as_ratio=True),
                "masked_mse": masked_mse_loss(pred, batch["targets"], batch["masks"],
                                              as_ratio=True)}

    def report(model):  # against the embedded field's true OPDs
        truth = splits["truth"]
        if truth is None:
            return {}
        return {f"test_{k}": v for k, v in evaluate_psf(model, truth).items()}

    plan = bcd.make_phase_plan(cfg.cycle, epochs_param=cfg.epochs_param,
                               epochs_nonparam=cfg.epochs_nonparam,
                               epochs_complete=cfg.epochs_complete, first_run=cfg.first_run)
    extras = (lambda p, e: {"l1_rate": l1_schedule_rule(e, cfg.l1_rate)}) \
        if cfg.l1_rate else None
    optimizers = lambda updates: {  # noqa: E731
        bcd.PARAM: _optimizer(cfg, cfg.lr_param, updates.get(bcd.PARAM, 1)),
        bcd.NONPARAM: _optimizer(cfg, cfg.lr_nonparam, updates.get(bcd.NONPARAM, 1))}
    task = Task(model=_model(cfg, from_key), loss_fn=loss_fn, train=splits["train"],
                val=splits["val"],
                plan=plan, blocks=bcd.model_blocks, optimizers=optimizers, metric_fn=metric_fn,
                batch_extras=extras)
    return RunTask(task=task, report=report, test=splits["test"])


def tabular_data(n: int, seed: int, n_in: int = 8, n_out: int = 2) -> dict[str, np.ndarray]:
    """A smooth nonlinear regression problem (the mlp model's embedded data)."""
    rng = np.random.default_rng(seed + 12345)
    x = rng.normal(size=(n, n_in)).astype(np.float32)
    w = np.random.default_rng(7).normal(size=(n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
    y = np.sin(2 * x @ w) + 0.5 * np.tanh(x[:, :n_out] * x[:, n_out:2 * n_out])
    return {"x": x, "y": (y + 0.01 * rng.normal(size=y.shape)).astype(np.float32)}


def _mlp_file(path: str) -> dict[str, np.ndarray]:
    arrays = load_arrays(path, float_keys=("x", "y"))
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path}: the mlp model needs arrays 'x' (N, features) and 'y' "
                        f"(N, outputs); found {sorted(arrays)}.")
    arrays = {"x": arrays["x"], "y": arrays["y"]}
    if arrays["y"].ndim == 1:
        arrays["y"] = arrays["y"][:, None]
    for k in ("x", "y"):
        if arrays[k].ndim != 2:
            raise DataError(f"{path}: array {k!r} has shape {arrays[k].shape}; the mlp "
                            f"model needs 2-D arrays (N, features); reshape it first.")
    return validate_arrays(arrays, float_keys=("x", "y"), where=path)


def mlp_task(cfg: TrainConfig) -> RunTask:
    from ..models import MLP

    splits = _splits(cfg, _mlp_file, lambda: {"train": tabular_data(cfg.n_train, cfg.seed),
                                               "val": tabular_data(cfg.n_val, cfg.seed + 1)})
    train, val = splits["train"], splits["val"]
    n_in, n_out = train["x"].shape[1], train["y"].shape[1]
    from_key = lambda key: MLP(n_in, n_out, 64, 3, key=key, dropout=cfg.dropout)  # noqa: E731

    if cfg.dropout:
        def loss_fn(model, batch, *, key):
            return mse_loss(model(batch["x"], key=key), batch["y"], as_ratio=True)
    else:
        def loss_fn(model, batch):
            return mse_loss(model(batch["x"]), batch["y"], as_ratio=True)

    def metric_fn(model, batch):
        err = model(batch["x"]) - batch["y"]
        return {"loss": mse_loss(err, 0.0, as_ratio=True),
                "mae": jnp.mean(jnp.abs(err))}

    task = Task(model=_model(cfg, from_key), loss_fn=loss_fn, train=train, val=val,
                plan=bcd.single_phase_plan(cfg.epochs, ("all",)),
                optimizers=lambda updates: {"all": _optimizer(cfg, cfg.learning_rate,
                                                              updates["all"])},
                metric_fn=metric_fn)
    return RunTask(task=task, test=splits["test"])


TASKS: dict[str, Callable[[TrainConfig], RunTask]] = dict(zip(MODELS, (psf_task, mlp_task),
                                                              strict=True))


def make_task(cfg: TrainConfig) -> RunTask:
    """The `RunTask` of ``cfg.model``.

    Raises:
        DataError: the data cannot be read or do not fit the model.
    """
    return TASKS[cfg.model](cfg)
