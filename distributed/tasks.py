"""What the command line trains: model, blocks, optimizers, data, loss and evaluation per
``--model``. Each task is plain data handed to the loop; nothing here runs training."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import bcd
from .config import TrainConfig
from .data import load_arrays, split_arrays, validate_arrays
from .losses import l1_schedule_rule, masked_mse_loss, total_loss, weighted_masked_mse_loss
from .optim import OptimizerConfig, make_optimizer

PSF_KEYS = ("positions", "seds", "targets", "masks")


@dataclasses.dataclass
class Task:
    """Everything model-specific the command line needs."""

    model_fn: Callable[[], Any]
    blocks_fn: Callable[[Any], dict[str, Any]]
    optimizers: dict[str, optax.GradientTransformation]
    plan: tuple[bcd.Phase, ...]
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    loss_fn: Callable[[Any, dict], tuple[jax.Array, dict]]
    eval_fn: Callable[[Any, dict], dict[str, jax.Array]]
    report_fn: Callable[[Any], dict[str, float]]
    batch_extras: Callable[[int], dict[str, float]] = lambda epoch: {}


def _optimizer(cfg: TrainConfig, lr: float) -> optax.GradientTransformation:
    return make_optimizer(
        OptimizerConfig(
            name=cfg.optimizer,
            learning_rate=lr,
            schedule=cfg.schedule,
            warmup_steps=cfg.warmup_steps,
            T0=cfg.scheduler_T0,
            weight_decay=cfg.weight_decay,
            grad_clip_norm=cfg.grad_clip_norm or None,
        )
    )


def _psf_data(cfg: TrainConfig) -> dict[str, dict[str, np.ndarray]]:
    from .models import make_star_field

    if cfg.data:
        arrays = load_arrays(cfg.data, float_keys=PSF_KEYS)
        missing = [k for k in PSF_KEYS if k not in arrays]
        if missing:
            from .data import DataError

            raise DataError(
                f"{cfg.data}: the psf model needs arrays {list(PSF_KEYS)} (+ optional "
                f"'weights'); missing {missing}. Save them with np.savez(path, positions=..., "
                f"seds=..., targets=..., masks=...)."
            )
        arrays.setdefault("weights", np.ones(len(arrays["positions"]), np.float32))
        arrays = {k: arrays[k] for k in (*PSF_KEYS, "weights")}
        train, val = split_arrays(arrays, (1 - cfg.val_fraction, cfg.val_fraction), cfg.seed)
        return {"train": train, "val": val, "test": None}
    field = make_star_field(n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test,
                            seed=cfg.seed)
    keep = (*PSF_KEYS, "weights")
    return {"train": {k: field["train"][k] for k in keep},
            "val": {k: field["val"][k] for k in keep}, "test": field["test"]}


def psf_task(cfg: TrainConfig) -> Task:
    from .models import PSFFieldModel, evaluate_psf

    splits = _psf_data(cfg)
    sample = splits["train"]
    n_pix = sample["targets"].shape[-1]
    n_lambda = sample["seds"].shape[-1]
    kwargs = {} if not cfg.data else {"n_pix": n_pix}
    model_fn = lambda: PSFFieldModel(key=jax.random.key(cfg.seed), **kwargs)
    probe = eqx.filter_eval_shape(model_fn)
    if probe.n_pix != n_pix or probe.n_lambda != n_lambda:
        from .data import DataError

        raise DataError(
            f"{cfg.data or 'data'}: targets are {n_pix}x{n_pix} with {n_lambda} SED bins, but the "
            f"psf model makes {probe.n_pix}x{probe.n_pix} images with {probe.n_lambda} bins; "
            f"reshape the data to match."
        )

    def loss_fn(model, batch):
        l1 = jnp.mean(batch["l1_rate"]) if "l1_rate" in batch else 0.0
        loss = total_loss(model, batch["positions"], batch["seds"], batch["targets"],
                          batch["masks"], sample_weight=batch["weights"],
                          l2_param=cfg.l2_param, l1_rate=l1)
        return loss, {}

    def eval_fn(model, batch):
        pred = model(batch["positions"], batch["seds"])
        return {"loss": weighted_masked_mse_loss(pred, batch["targets"], batch["masks"],
                                                 batch["weights"]),
                "masked_mse": masked_mse_loss(pred, batch["targets"], batch["masks"])}

    def report_fn(model):
        split = splits["test"]
        if split is None:
            return {}
        return {f"test_{k}": v for k, v in evaluate_psf(model, split).items()}

    plan = bcd.make_phase_plan(cfg.cycle, epochs_param=cfg.epochs_param,
                               epochs_nonparam=cfg.epochs_nonparam,
                               epochs_complete=cfg.epochs_complete, first_run=cfg.first_run)
    extras = (lambda epoch: {"l1_rate": l1_schedule_rule(epoch, cfg.l1_rate)}) \
        if cfg.l1_rate else (lambda epoch: {})
    return Task(
        model_fn=model_fn,
        blocks_fn=bcd.model_blocks,
        optimizers={bcd.PARAM: _optimizer(cfg, cfg.lr_param),
                    bcd.NONPARAM: _optimizer(cfg, cfg.lr_nonparam)},
        plan=plan,
        train=splits["train"],
        val=splits["val"],
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        report_fn=report_fn,
        batch_extras=extras,
    )


def tabular_data(n: int, seed: int, n_in: int = 8, n_out: int = 2) -> dict[str, np.ndarray]:
    """A smooth nonlinear regression problem (the mlp model's embedded data)."""
    rng = np.random.default_rng(seed + 12345)
    x = rng.normal(size=(n, n_in)).astype(np.float32)
    w = np.random.default_rng(7).normal(size=(n_in, n_out)).astype(np.float32) / np.sqrt(n_in)
    y = np.sin(2 * x @ w) + 0.5 * np.tanh(x[:, :n_out] * x[:, n_out:2 * n_out])
    return {"x": x, "y": (y + 0.01 * rng.normal(size=y.shape)).astype(np.float32)}


def mlp_task(cfg: TrainConfig) -> Task:
    from .models import MLP

    if cfg.data:
        arrays = load_arrays(cfg.data, float_keys=("x", "y"))
        if "x" not in arrays or "y" not in arrays:
            from .data import DataError

            raise DataError(f"{cfg.data}: the mlp model needs arrays 'x' (N, features) and 'y' "
                            f"(N, outputs); found {sorted(arrays)}.")
        arrays = {"x": arrays["x"], "y": arrays["y"]}
        if arrays["y"].ndim == 1:
            arrays["y"] = arrays["y"][:, None]
        for k in ("x", "y"):
            if arrays[k].ndim != 2:
                from .data import DataError

                raise DataError(f"{cfg.data}: array {k!r} has shape {arrays[k].shape}; the mlp "
                                f"model needs 2-D arrays (N, features); reshape it first.")
        validate_arrays(arrays, float_keys=("x", "y"), where=cfg.data)
        train, val = split_arrays(arrays, (1 - cfg.val_fraction, cfg.val_fraction), cfg.seed)
    else:
        train = tabular_data(cfg.n_train, cfg.seed)
        val = tabular_data(cfg.n_val, cfg.seed + 1)
    n_in, n_out = train["x"].shape[1], train["y"].shape[1]
    model_fn = lambda: MLP(n_in, n_out, 64, 3, key=jax.random.key(cfg.seed))

    def loss_fn(model, batch):
        return jnp.mean((model(batch["x"]) - batch["y"]) ** 2), {}

    def eval_fn(model, batch):
        err = model(batch["x"]) - batch["y"]
        return {"loss": jnp.mean(err**2), "rmse": jnp.sqrt(jnp.mean(err**2)),
                "mae": jnp.mean(jnp.abs(err))}

    return Task(
        model_fn=model_fn,
        blocks_fn=lambda m: {"all": bcd.complete_filter(m)},
        optimizers={"all": _optimizer(cfg, cfg.learning_rate)},
        plan=bcd.single_phase_plan(cfg.epochs),
        train=train,
        val=val,
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        report_fn=lambda model: {},
    )


TASKS = {"psf": psf_task, "mlp": mlp_task}


def make_task(cfg: TrainConfig) -> Task:
    return TASKS[cfg.model](cfg)
