"""WaveDiff's multi-phase BCD training (seed 000): `general_train_cycle`, over the one engine.

The phases of `bcd.make_phase_plan` are switched by the global step inside the engine's step
function, each phase calling the sharded `TrainStep` with its active blocks (one compile per
phase kind); per-block optax states live in the `TrainState` and survive across phases. Data
come from the engine's Grain stream (shuffled per epoch, deterministic in the key) prefetched
onto the mesh; validation scores every row with the engine's evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core import bcd
from ..core.losses import (
    l1_schedule_rule,
    takes_argument,
    total_loss,
    weighted_masked_mse_loss,
)
from ..core.mesh import make_mesh
from ..core.optim import configure_optimizer
from ..engine import Task, build
from ..loop import run_loop
from .make_step import seed_from_key

PSF_KEYS = ("positions", "seds", "targets", "masks", "weights")
REQUIRED_HPARAMS = ("n_epochs_param", "n_epochs_nonparam", "lr_param", "lr_nonparam",
                    "batch_size")
HPARAM_DEFAULTS: dict[str, Any] = {"n_epochs_complete": 0, "l2_param": 1e-4, "l1_rate": 0.0,
                                   "cycle_def": "complete", "first_run": False}


def default_mesh(mesh):
    """``mesh``, or all devices data parallel."""
    return make_mesh("data:-1") if mesh is None else mesh


def _hparams(h: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_HPARAMS if k not in h]
    if missing:
        raise ValueError(f"training_hparams is missing {missing}; it needs {list(REQUIRED_HPARAMS)}"
                         f" (optional: {HPARAM_DEFAULTS}).")
    unknown = sorted(set(h) - set(REQUIRED_HPARAMS) - set(HPARAM_DEFAULTS))
    if unknown:
        raise ValueError(f"training_hparams has unknown key(s) {unknown}; valid keys: "
                         f"{[*REQUIRED_HPARAMS, *HPARAM_DEFAULTS]}.")
    h = {**HPARAM_DEFAULTS, **h}
    for k in ("lr_param", "lr_nonparam"):
        if not (isinstance(h[k], (int, float)) and h[k] > 0 and math.isfinite(h[k])):
            raise ValueError(f"training_hparams[{k!r}]={h[k]!r} must be a number > 0.")
    for k in ("l2_param", "l1_rate"):
        if not (isinstance(h[k], (int, float)) and h[k] >= 0 and math.isfinite(h[k])):
            raise ValueError(f"training_hparams[{k!r}]={h[k]!r} must be a finite number >= 0.")
    b = h["batch_size"]
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ValueError(f"training_hparams['batch_size']={b!r} must be a positive integer.")
    return h


def psf_arrays(data: Sequence | Mapping, what: str) -> dict[str, np.ndarray]:
    """The seed tuple ``(positions, packed_seds, targets, masks[, sample_weights])`` (or a dict
    with those keys) as a dict of float32 arrays (weights default to ones)."""
    if isinstance(data, Mapping):
        data = tuple(data[k] for k in PSF_KEYS if k in data)
    if not isinstance(data, (tuple, list)) or len(data) not in (4, 5):
        raise ValueError(f"{what} must be a tuple (positions, packed_seds, targets, masks) with an "
                         f"optional 5th element of sample weights, or pass loss_fn= for other "
                         f"data; got {type(data).__name__}"
                         f"{f' of length {len(data)}' if isinstance(data, (tuple, list)) else ''}.")
    arrays = _rows(data, what, dtype=np.float32)
    n = len(arrays[0])
    if len(arrays) == 4:
        arrays.append(np.ones(n, np.float32))
    return dict(zip(PSF_KEYS, arrays, strict=False))


def _rows(data: Sequence, what: str, dtype=None) -> list[np.ndarray]:
    arrays = [np.asarray(jax.device_get(a), dtype) for a in data]
    n = len(arrays[0]) if arrays and arrays[0].ndim else 0
    lengths = [a.shape[0] if a.ndim else None for a in arrays]
    if not arrays or any(length != n for length in lengths) or n == 0:
        raise ValueError(f"{what}: every array needs the same number of rows (at least one); "
                         f"got lengths {lengths}.")
    return arrays


def user_arrays(data: Sequence | Mapping, what: str) -> tuple[dict[str, np.ndarray], Any]:
    """A tuple or dict of same-length arrays -> ``(dict of arrays, rebuild)`` where
    ``rebuild(batch_dict)`` gives the batch back in the user's structure."""
    if isinstance(data, Mapping):
        keys = [str(k) for k in data]
        arrays = dict(zip(keys, _rows(list(data.values()), what), strict=True))
        return arrays, lambda b: {k: b[k] for k in keys}
    if not isinstance(data, (tuple, list)):
        raise ValueError(f"{what} must be a tuple or dict of arrays with one row per example; "
                         f"got {type(data).__name__}.")
    arrays = {str(i): a for i, a in enumerate(_rows(data, what))}
    return arrays, lambda b: tuple(b[str(i)] for i in range(len(arrays)))


def _psf_task_parts(h, train_data, val_data):
    """Default WaveDiff data and losses: `total_loss` to train, the weighted masked MSE (its data
    term) to validate."""
    l2, use_l1 = h["l2_param"], h["l1_rate"] > 0

    def loss(m, b):
        l1 = jnp.mean(b["l1_rate"]) if use_l1 else 0.0
        return total_loss(m, b["positions"], b["seds"], b["targets"], b["masks"],
                          sample_weight=b["weights"], l2_param=l2, l1_rate=l1, as_ratio=True)

    def metric(m, b):
        pred = m(b["positions"], b["seds"])
        return {"loss": weighted_masked_mse_loss(pred, b["targets"], b["masks"], b["weights"],
                                                 as_ratio=True)}

    extras = (lambda p, e: {"l1_rate": l1_schedule_rule(e, h["l1_rate"])}) if use_l1 else None
    val = None if val_data is None else psf_arrays(val_data, "val_data")
    return psf_arrays(train_data, "train_data"), val, loss, metric, extras


def _user_task_parts(loss_fn, train_data, val_data):
    train, rebuild = user_arrays(train_data, "train_data")
    val = None
    if val_data is not None:
        val, _ = user_arrays(val_data, "val_data")
        if sorted(val) != sorted(train):
            raise ValueError(f"val_data has the arrays {sorted(val)} but train_data has "
                             f"{sorted(train)}; give both the same structure.")

    if takes_argument(loss_fn, "key"):
        def loss(m, b, *, key):
            return loss_fn(m, rebuild(b), key=key)
    else:
        def loss(m, b):
            return loss_fn(m, rebuild(b))

    loss.splittable = getattr(loss_fn, "splittable", True)
    return train, val, loss, None, None


def general_train_cycle(model, train_data, val_data, training_hparams, key, *, mesh=None,
                        loss_fn=None, filter_specs: Mapping[str, Any] | None = None,
                        optimizers: Mapping[str, Any] | None = None, show_progress=False,
                        **loop_options) -> dict[str, Any]:
    """Multi-phase BCD training of a semi-parametric model (seed 000's ``general_train_cycle``).

    Args:
        model: an Equinox model that names its blocks (class attributes ``param_fields`` /
            ``nonparam_fields``), or pass ``filter_specs={"param": ..., "nonparam": ...}``;
            ``first_run`` needs ``set_alpha_zero`` / ``set_alpha_identity``.
        train_data, val_data: without ``loss_fn``, the seed tuple ``(positions, packed_seds,
            targets, masks[, sample_weights])`` trained with `total_loss`. With ``loss_fn``, any
            tuple or dict of same-length arrays (one row per example), handed to ``loss_fn`` in
            the same structure. ``val_data`` may be None (no validation).
        training_hparams: ``n_epochs_param``, ``n_epochs_nonparam``, ``n_epochs_complete``,
            ``lr_param``, ``lr_nonparam``, ``batch_size`` (global), ``l2_param``, ``l1_rate``
            (halved every 10 epochs of each phase by `l1_schedule_rule`), ``cycle_def`` (one of
            `bcd.CYCLES`), ``first_run``.
        key: PRNG key (data order, and the state's key: a ``loss_fn`` taking ``key=`` gets a
            fresh key each step).
        mesh: device mesh (default: all devices, data parallel).
        loss_fn: ``(model, batch[, key=...]) -> loss`` (a scalar mean over the batch's examples,
            or a `distributed.Ratio`) replacing `total_loss` (then ``l2_param`` and ``l1_rate``
            are not used); it is also the validation loss, on every row of ``val_data``. Without
            it the validation loss is the weighted masked MSE (the data term of `total_loss`).
        filter_specs: ``{"param": spec, "nonparam": spec}`` replacing the model's named blocks.
        optimizers: ``{"param": tx, "nonparam": tx}`` replacing Adam (TF defaults) at
            ``lr_param`` / ``lr_nonparam``.
        show_progress: a progress bar / log lines.
        **loop_options: passed to `run_loop` (callbacks, hooks, checkpointer, recovery, ...).

    Returns:
        ``{"model", "train_losses", "val_losses", "phases": [{"name", "blocks", "epochs",
        "first_epoch", "train_losses", "val_losses"}], "history", "state"}`` (losses per epoch).

    Raises:
        ValueError: bad hyperparameters (an unknown ``cycle_def`` lists the five cycles), data
            of the wrong structure, a model without named blocks and no ``filter_specs``.
    """
    h = _hparams(training_hparams)
    mesh = default_mesh(mesh)
    plan = bcd.make_phase_plan(h["cycle_def"], epochs_param=h["n_epochs_param"],
                               epochs_nonparam=h["n_epochs_nonparam"],
                               epochs_complete=h["n_epochs_complete"], first_run=h["first_run"])
    if loss_fn is None:
        train, val, loss, metric, extras = _psf_task_parts(h, train_data, val_data)
    else:
        train, val, loss, metric, extras = _user_task_parts(loss_fn, train_data, val_data)
    blocks = dict(filter_specs) if filter_specs is not None else bcd.model_blocks(model)
    if optimizers is None:
        optimizers = {bcd.PARAM: configure_optimizer(h["lr_param"]),
                      bcd.NONPARAM: configure_optimizer(h["lr_nonparam"])}
    state_key, data_key = jax.random.split(key)
    task = Task(model=model, loss_fn=loss, train=train, val=val, plan=plan, blocks=blocks,
                optimizers=optimizers, metric_fn=metric, batch_extras=extras)
    engine = build(task, mesh=mesh, batch_size=h["batch_size"], seed=seed_from_key(data_key),
                   key=state_key)
    log_every = loop_options.pop("log_every", engine.total_steps + 1)
    state, result = run_loop(engine.state, engine.step_fn, data_iterator=engine.data,
                             num_epochs=engine.total_epochs, clock=engine.clock,
                             evaluate=engine.evaluator, show_progress=show_progress,
                             log_every=log_every, **loop_options)
    hist = result.history
    train_losses, val_losses = hist.get("train_loss", []), hist.get("val_loss", [])
    phases, start = [], 0
    for p in plan:
        stop = start + p.epochs
        phases.append({"name": p.name, "blocks": p.blocks, "epochs": p.epochs,
                       "first_epoch": start, "train_losses": train_losses[start:stop],
                       "val_losses": val_losses[start:stop]})
        start = stop
    return {"model": state.model, "train_losses": train_losses, "val_losses": val_losses,
            "phases": phases, "history": hist, "state": state}
