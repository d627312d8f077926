"""The config-driven `Trainer` of seeds 001/003/004, a thin layer over `run_loop`.

``Trainer(model, config).train(train_data, val_data) -> (model, history)``: the model trains
data-parallel over a mesh (default: all devices) with the sharded `TrainStep`, Grain shuffles
the mini-batches, validation runs every ``validate_every`` epochs and `compute_metrics` turns
its predictions into ``val_rmse`` / ``val_mae`` / ``val_mape`` / ``val_r2``. Early stopping
restores the best model; ``save_best`` writes it with `save_checkpoint` and seed-001 metadata;
non-finite updates are skipped in the step and loss explosions roll back with a lower LR.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import bcd
from .callbacks import Callback, EarlyStopping
from .cycle import check_batch, default_mesh, padded_chunks, sharded_state

log = logging.getLogger("distributed")

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "exponential", "linear", "cosine_warm_restarts")
_ALIASES = {"num_epochs": "epochs", "validation_frequency": "validate_every",
            "checkpoint_frequency": "checkpoint_every", "patience": "early_stopping_patience"}


# ------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """What `Trainer` does, validated on creation (a `ValueError` names the bad field).

    Epoch-based fields: ``epochs`` (alias ``num_epochs``), ``print_every`` (0: silent),
    ``validate_every`` (alias ``validation_frequency``), ``early_stopping_patience`` (alias
    ``patience``; None/0: off; counted in validations), ``checkpoint_every`` (alias
    ``checkpoint_frequency``: Orbax checkpoints under ``save_dir/run_name/checkpoints``; 0: off),
    ``scheduler_T0`` (first warm-restart period; setting it alone selects
    ``cosine_warm_restarts``). ``warmup_steps`` is in steps.

    Loss: ``loss`` names a registered loss (`distributed.losses.list_losses`), built with
    ``loss_params`` (plus ``huber_delta`` for "huber").
    Clipping: ``gradient_clip`` clips each gradient element to [-c, c] (seed 003),
    ``grad_clip_norm`` the global norm. Mixed precision: ``compute_dtype`` ("bfloat16"), or
    ``use_amp=True`` which means bfloat16 on GPU/TPU and float32 on CPU.
    Recovery: a loss above ``loss_explosion_threshold`` or above ``explosion_factor`` x its
    running mean rolls back to the last good state with the LR times ``lr_reduction``, at most
    ``max_retries`` times (both off by default; non-finite updates are always skipped).
    ``save_best`` writes ``save_dir/run_name/best.eqx`` (``save_dir`` default
    ``~/.cache/distributed/saved_models``); ``run_name`` must stay inside ``save_dir``.
    """

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    loss: str = "mse"
    loss_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    huber_delta: float | None = None
    optimizer: str = "adam"
    scheduler: str | None = None
    scheduler_T0: int | None = None
    decay_rate: float = 0.96
    warmup_steps: int = 0
    weight_decay: float = 0.0
    gradient_clip: float | None = None
    grad_clip_norm: float | None = None
    use_amp: bool = False
    compute_dtype: str | None = None
    save_best: bool = False
    save_dir: str | None = None
    run_name: str = "model"
    print_every: int = 10
    validate_every: int = 1
    early_stopping: bool = True
    early_stopping_patience: int | None = None
    checkpoint_every: int = 0
    max_retries: int = 3
    loss_explosion_threshold: float | None = None
    explosion_factor: float = 0.0
    lr_reduction: float = 0.5
    seed: int = 0
    shuffle: bool = True
    output_names: Sequence[str] | None = None

    # seed 004's names for the same settings
    num_epochs = property(lambda self: self.epochs)
    validation_frequency = property(lambda self: self.validate_every)
    checkpoint_frequency = property(lambda self: self.checkpoint_every)
    patience = property(lambda self: self.early_stopping_patience)

    def __post_init__(self):
        if self.scheduler is None:
            object.__setattr__(self, "scheduler", "cosine_warm_restarts" if self.scheduler_T0
                               else "constant")
        object.__setattr__(self, "loss_params", dict(self.loss_params))
        if self.output_names is not None:
            object.__setattr__(self, "output_names", tuple(str(n) for n in self.output_names))
        _validate(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """Build from a plain dict (seed 003's ``config={...}``), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)} | set(_ALIASES)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainingConfig: unknown key(s) {unknown}; valid keys: "
                             f"{sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _init_with_aliases(init):
    def __init__(self, *args, **kwargs):
        for alias, name in _ALIASES.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name in kwargs and kwargs[name] != value:
                    raise ValueError(f"TrainingConfig: {alias}={value!r} and {name}="
                                     f"{kwargs[name]!r} disagree; give only one.")
                kwargs[name] = value
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    return __init__


TrainingConfig.__init__ = _init_with_aliases(TrainingConfig.__init__)


def _int(cfg, name, low, allow_none=False):
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ValueError(f"TrainingConfig.{name}={v!r} must be an integer >= {low}"
                         f"{' (or None)' if allow_none else ''}.")


def _num(cfg, name, low, strict=False, allow_none=False):
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
        v > low if strict else v >= low)
    if not ok:
        raise ValueError(f"TrainingConfig.{name}={v!r} must be a finite number "
                         f"{'>' if strict else '>='} {low}{' (or None)' if allow_none else ''}.")


def _validate(cfg: TrainingConfig) -> None:
    _int(cfg, "epochs", 1)
    _int(cfg, "batch_size", 1)
    for name in ("print_every", "warmup_steps", "checkpoint_every", "max_retries", "seed"):
        _int(cfg, name, 0)
    _int(cfg, "validate_every", 1)
    _int(cfg, "early_stopping_patience", 0, allow_none=True)
    _int(cfg, "scheduler_T0", 1, allow_none=True)
    _num(cfg, "learning_rate", 0, strict=True)
    for name in ("weight_decay", "explosion_factor"):
        _num(cfg, name, 0)
    for name in ("gradient_clip", "grad_clip_norm", "loss_explosion_threshold", "huber_delta"):
        _num(cfg, name, 0, strict=True, allow_none=True)
    if not (isinstance(cfg.decay_rate, (int, float)) and 0 < cfg.decay_rate <= 1):
        raise ValueError(f"TrainingConfig.decay_rate={cfg.decay_rate!r} must be in (0, 1].")
    if not (isinstance(cfg.lr_reduction, (int, float)) and 0 < cfg.lr_reduction <= 1):
        raise ValueError(f"TrainingConfig.lr_reduction={cfg.lr_reduction!r} must be in (0, 1].")
    if 0 < cfg.explosion_factor <= 1:
        raise ValueError(f"TrainingConfig.explosion_factor={cfg.explosion_factor} must be > 1 "
                         f"(or 0: off).")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"TrainingConfig.optimizer={cfg.optimizer!r}; choose one of {OPTIMIZERS}.")
    if cfg.scheduler not in SCHEDULERS:
        raise ValueError(f"TrainingConfig.scheduler={cfg.scheduler!r}; choose one of "
                         f"{SCHEDULERS}.")
    if cfg.scheduler == "cosine_warm_restarts" and not cfg.scheduler_T0:
        raise ValueError("TrainingConfig.scheduler='cosine_warm_restarts' needs scheduler_T0 "
                         "(the first period, in epochs).")
    if cfg.compute_dtype not in (None, "float32", "bfloat16", "float16"):
        raise ValueError(f"TrainingConfig.compute_dtype={cfg.compute_dtype!r}; use None, "
                         f"'float32', 'bfloat16' or 'float16'.")
    from .losses import list_losses

    if not isinstance(cfg.loss, str) or cfg.loss not in list_losses():
        raise ValueError(f"TrainingConfig.loss={cfg.loss!r} is not a registered loss; choose one "
                         f"of {list_losses()} or register yours with register_loss.")
    if cfg.huber_delta is not None and cfg.loss != "huber":
        raise ValueError(f"TrainingConfig.huber_delta is set but loss={cfg.loss!r}; use "
                         f"loss='huber' or drop huber_delta.")
    name = cfg.run_name
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise ValueError(f"TrainingConfig.run_name={name!r} must be a non-empty name.")
    parts = Path(name).parts
    if os.path.isabs(name) or name.startswith(("/", "\\", "~")) or ".." in parts or \
            ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"TrainingConfig.run_name={name!r} must be a relative name inside "
                         f"save_dir (no absolute path, no '..').")


# ----------------------------------------------------------------------------------- history
class History(dict):
    """Per-epoch metric lists, by key (``history["train_loss"]``) or attribute
    (``history.train_loss``), plus ``best_val_loss`` (alias ``best_test_loss``), ``best_epoch``
    (0-based), ``stopped_epoch`` (None if all epochs ran), ``epochs_run``, ``nonfinite_skipped``
    and ``lr_scale`` (below 1 after loss-explosion rollbacks).

    Keys: ``train_loss``, ``grad_norm``, ``lr`` (per epoch); ``val_loss``, ``val_rmse``,
    ``val_mae``, ``val_mape``, ``val_r2``, ``val_per_output_rmse`` and ``val_epoch`` (the
    epoch of each validation).
    """

    best_val_loss: float | None = None
    best_epoch: int | None = None
    stopped_epoch: int | None = None
    epochs_run: int = 0
    nonfinite_skipped: int = 0
    lr_scale: float = 1.0

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"History has no metric {name!r}; it has {sorted(self)}.") \
                from None

    @property
    def best_test_loss(self) -> float | None:
        return self.best_val_loss


# ------------------------------------------------------------------------------- data input
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
class _Best(EarlyStopping):
    """Tracks the best monitored value (counting validations, not epochs), saves the best
    model when asked, and - with patience - stops early and restores the best state."""

    def __init__(self, trainer: Trainer, monitor: str, patience: int | None):
        super().__init__(monitor=monitor, patience=patience or 2**31 - 1,
                         restore_best=bool(patience))
        self.trainer, self.validated, self.val_epochs = trainer, False, []

    def on_epoch_end(self, epoch, metrics):
        if self.monitor.startswith("val_"):
            if not self.validated:
                return None
            self.val_epochs.append(epoch)
        self.validated = False
        stop = super().on_epoch_end(epoch, metrics)
        if self.best_epoch == epoch and self.trainer.config.save_best:
            self.trainer._save_best(self._state.model, epoch, metrics)
        return stop


class _Reporter(Callback):
    """Prints progress every ``print_every`` epochs and forwards metrics to a tracker."""

    def __init__(self, epochs: int, print_every: int, tracker: Any):
        self.epochs, self.print_every, self.tracker = epochs, print_every, tracker

    def on_epoch_end(self, epoch, metrics):
        shown = {k: v for k, v in metrics.items() if k.startswith(("train_loss", "val_"))}
        if self.print_every and ((epoch + 1) % self.print_every == 0 or epoch == 0
                                 or epoch + 1 == self.epochs):
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
            print(f"epoch {epoch + 1}/{self.epochs}: {text}", flush=True)
        if self.tracker is not None and hasattr(self.tracker, "log_metrics"):
            self.tracker.log_metrics(dict(shown), step=epoch)


def _arch(model: Any) -> dict:
    if callable(getattr(model, "arch", None)):
        return model.arch()
    if isinstance(model, eqx.nn.MLP):
        return {"name": "eqx.nn.MLP", "in_size": model.in_size, "out_size": model.out_size,
                "width_size": model.width_size, "depth": model.depth,
                "activation": getattr(model.activation, "__name__", repr(model.activation))}
    return {"name": type(model).__name__}


def _takes(fn: Callable, name: str, nth_positional: int | None = None) -> bool:
    """Whether ``fn`` accepts argument ``name`` (or an ``nth_positional`` argument)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return nth_positional is not None
    if any(p.name == name for p in params):
        return True
    if nth_positional is None:
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > nth_positional or any(p.kind is p.VAR_POSITIONAL for p in params)


# ----------------------------------------------------------------------------------- trainer
class Trainer:
    """Config-driven training over `run_loop` (seeds 001/003/004).

    Args:
        model: an Equinox model. Called per example (``jax.vmap``) when ``model(x[0])`` works
            (e.g. ``eqx.nn.MLP``), else on the batch.
        config: a `TrainingConfig` or a plain dict of its fields.
        optimizer: an optax transformation used as given (else built from the config).
        callbacks: `Callback` objects (``on_epoch_end(epoch, metrics)`` ...).
        mesh: device mesh (default: all devices, data parallel).
        loss_fn: ``(pred, target[, weights][, inputs=x]) -> scalar``, replacing the config's
            registry loss. ``loss_config={"name": ..., **params}`` picks a registry loss.
        tracker: an object with ``log_metrics(dict, step=epoch)`` (seed 003); may also be
            passed third positionally in place of ``optimizer``.
        filter_spec: which arrays train (default: every floating array of the model).
    """

    def __init__(self, model, config, optimizer=None, callbacks=(), mesh=None, loss_fn=None, *,
                 loss_config: Mapping[str, Any] | None = None, tracker: Any = None,
                 filter_spec: Any = None):
        if isinstance(config, Mapping):
            config = TrainingConfig.from_dict(config)
        if not isinstance(config, TrainingConfig):
            raise TypeError(f"config must be a TrainingConfig or a dict, got "
                            f"{type(config).__name__}.")
        if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
            if tracker is None and hasattr(optimizer, "log_metrics"):
                optimizer, tracker = None, optimizer
            else:
                raise TypeError(f"optimizer must be an optax GradientTransformation, got "
                                f"{type(optimizer).__name__}.")
        if loss_config is not None:
            params = dict(loss_config)
            config = dataclasses.replace(config, loss=params.pop("name", config.loss),
                                         loss_params=params, huber_delta=None)
        self.model, self.config, self.optimizer = model, config, optimizer
        self.callbacks, self.mesh, self.tracker = list(callbacks), mesh, tracker
        self.filter_spec = filter_spec
        if loss_fn is None:
            from .losses import get_loss

            params = dict(config.loss_params)
            if config.huber_delta is not None:
                params["delta"] = config.huber_delta
            loss_fn = get_loss(config.loss, **params)
        self.loss_fn = loss_fn
        self.state = None
        self.history: History | None = None
        self.best_path = Path(config.save_dir or "~/.cache/distributed/saved_models") \
            .expanduser() / config.run_name / "best.eqx"
        self._last_val: dict[str, Any] = {}

    # -- pieces -----------------------------------------------------------------------------
    def _predictor(self, x0: np.ndarray) -> Callable:
        try:
            eqx.filter_eval_shape(self.model, jnp.asarray(x0[0]))
            return lambda model, x: jax.vmap(model)(x)
        except Exception:  # noqa: BLE001 - not a per-example model: call it on the batch
            return lambda model, x: model(x)

    def _compute_dtype(self) -> str | None:
        if self.config.compute_dtype is not None:
            return None if self.config.compute_dtype == "float32" else self.config.compute_dtype
        if self.config.use_amp and jax.default_backend() != "cpu":
            return "bfloat16"
        return None  # AMP is off on CPU (as seed 003 turns it off without CUDA)

    def _build_optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        from .optim import OptimizerConfig, make_optimizer

        cfg = self.config
        if self.optimizer is not None:
            if cfg.gradient_clip or cfg.grad_clip_norm:
                log.warning("Trainer: a custom optimizer is used as given; the config's "
                            "gradient_clip / grad_clip_norm are ignored (add optax.clip to it).")
            return self.optimizer
        total = cfg.epochs * steps_per_epoch
        return make_optimizer(OptimizerConfig(
            name=cfg.optimizer, learning_rate=cfg.learning_rate, schedule=cfg.scheduler,
            warmup_steps=cfg.warmup_steps, total_steps=max(total, cfg.warmup_steps + 1),
            T0=None if not cfg.scheduler_T0 else cfg.scheduler_T0 * steps_per_epoch,
            decay_rate=cfg.decay_rate, transition_steps=steps_per_epoch,
            weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm,
            grad_clip_value=cfg.gradient_clip))

    def _recovery(self):
        from .recovery import RecoveryPolicy

        cfg = self.config
        if not cfg.explosion_factor and cfg.loss_explosion_threshold is None:
            return None
        return RecoveryPolicy(explosion_factor=cfg.explosion_factor,
                              threshold=cfg.loss_explosion_threshold or math.inf,
                              max_retries=cfg.max_retries, lr_reduction=cfg.lr_reduction,
                              window=10, snapshot_every=5)

    def _loss(self, predict):
        base = self.loss_fn
        takes_weights = _takes(base, "weights", 2)
        takes_inputs = _takes(base, "inputs")

        def loss(model, batch):
            pred = predict(model, batch["x"])
            kwargs = {"inputs": batch["x"]} if takes_inputs else {}
            if "weights" in batch:
                return base(pred, batch["y"], batch["weights"], **kwargs)
            return base(pred, batch["y"], **kwargs)

        return loss, takes_weights

    def _fit_targets(self, data: dict, out_shape: tuple, what: str) -> dict:
        y = data["y"]
        if y.shape[1:] != out_shape:
            if math.prod(y.shape[1:]) != math.prod(out_shape):
                raise ValueError(f"{what}: targets have shape {y.shape[1:]} per example but the "
                                 f"model outputs {out_shape}.")
            data = dict(data, y=y.reshape(len(y), *out_shape))
        return data

    def _validation(self, val: dict, predict, shardings, mesh):
        from .sharding import batch_sharding
        from .step import make_eval_step

        shards = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names)
        self._val_chunks = [
            ({"x": jax.device_put(c["x"], batch_sharding(mesh))}, valid)
            for c, valid in padded_chunks({"x": val["x"]}, max(self.config.batch_size, 256),
                                          shards)]
        self._evaluate = make_eval_step(lambda m, b: {"pred": predict(m, b["x"])}, mesh=mesh,
                                        model_shardings=shardings.model)
        loss_fn, _ = self._loss(lambda pred, x: pred)  # applied to the predictions
        self._val_loss, self._val = jax.jit(loss_fn), val

        def val_step_fn(state, batch, key):
            self._best._state = state
            metrics = self.validate(state.model)
            self._best.validated = True
            return state, metrics

        return val_step_fn

    def validate(self, model) -> dict[str, float]:
        """Validation metrics of ``model`` on the ``val_data`` of the running `train` call:
        ``loss`` (the training loss) and `compute_metrics`' ``rmse``, ``mae``, ``mape``,
        ``r2`` (per-output RMSE goes to ``history["val_per_output_rmse"]``). Called at each
        validation epoch; override to customise (return at least ``loss``)."""
        from .metrics import compute_metrics

        y = self._val["y"]
        n = len(y)
        flat = (lambda a: a.reshape(n)) if y.size == n else (lambda a: a.reshape(n, -1))
        pred = np.concatenate([np.asarray(jax.device_get(self._evaluate(model, c)["pred"]))
                               [:valid] for c, valid in self._val_chunks])
        m = compute_metrics(flat(y), flat(pred), self.config.output_names)
        loss = self._val_loss(jnp.asarray(pred), {k: jnp.asarray(v) for k, v in
                                                  self._val.items()})
        self._last_val = m
        self._per_output.append({k: float(v) for k, v in m["per_output_rmse"].items()})
        return {"loss": float(loss), **{k: float(m[k]) for k in ("rmse", "mae", "mape", "r2")}}

    def _save_best(self, model, epoch: int, metrics: dict) -> None:
        from .model_io import make_metadata, save_checkpoint

        val_loss = metrics.get("val_loss")
        meta = make_metadata(arch=_arch(model), step=(epoch + 1) * self._spe, epoch=epoch + 1,
                             train_loss=metrics.get("train_loss"), val_loss=val_loss,
                             per_output_rmse=self._last_val.get("per_output_rmse"),
                             config=self.config.to_dict())
        meta["training"]["test_loss"] = meta["training"]["val_loss"]
        save_checkpoint(model, self.best_path, meta)

    # -- training -----------------------------------------------------------------------------
    def train(self, train_data, val_data=None) -> tuple[Any, History]:
        """Train; returns ``(model, history)``. See `as_arrays` for the accepted data forms;
        ``train_data`` may also be a zero-argument callable returning an iterator of (x, y)
        batches for one epoch (streamed as given, no shuffling; called once more to count)."""
        from .data import DevicePrefetcher, make_dataset, to_global
        from .loop import run_loop
        from .step import StepOptions, TrainStep

        cfg, model = self.config, self.model
        mesh = default_mesh(self.mesh)
        stream = callable(train_data) and not hasattr(train_data, "__iter__")
        if stream:
            it = iter(train_data())
            first = next(it, None)
            if first is None:
                raise ValueError("train_data() yielded no batches.")
            spe = 1 + sum(1 for _ in it)
            sample = as_arrays([first], "train_data")
        else:
            sample = as_arrays(train_data, "train_data")
            check_batch(cfg.batch_size, len(sample["x"]), mesh, "TrainingConfig.batch_size")
            spe = len(sample["x"]) // cfg.batch_size
        self._spe = spe
        predict = self._predictor(sample["x"])
        out_shape = eqx.filter_eval_shape(predict, model, jnp.asarray(sample["x"][:1])).shape[1:]
        loss, takes_weights = self._loss(predict)
        if "weights" in sample and not takes_weights:
            raise ValueError("the data have sample weights but the loss function takes no "
                             "`weights` argument.")
        optimizer = self._build_optimizer(spe)
        blocks = {"all": self.filter_spec if self.filter_spec is not None
                  else bcd.complete_filter(model)}
        state, shardings = sharded_state(model, {"all": optimizer}, blocks,
                                         key=jax.random.key(cfg.seed), mesh=mesh)
        step = TrainStep(loss, {"all": optimizer}, blocks, mesh=mesh, state_shardings=shardings,
                         options=StepOptions(compute_dtype=self._compute_dtype()))
        source: dict[str, Any] = {}
        if stream:
            def batches():
                for b in train_data():
                    host = self._fit_targets(as_arrays([b], "train_data"), out_shape, "train_data")
                    yield to_global(host, mesh)

            source["data_iterator_fn"] = batches
        else:
            train = self._fit_targets(sample, out_shape, "train_data")
            ds = make_dataset(train, global_batch_size=cfg.batch_size, seed=cfg.seed,
                              shuffle=cfg.shuffle, num_epochs=None)
            source["data_iterator"] = DevicePrefetcher(iter(ds), mesh, size=2)
        val = as_arrays(val_data, "val_data")
        patience = cfg.early_stopping_patience if cfg.early_stopping else None
        self._best = _Best(self, "val_loss" if val is not None else "train_loss", patience)
        self._per_output, self._last_val, self._val_epochs = [], {}, []
        val_step_fn = None
        if val is not None:
            val = self._fit_targets(val, out_shape, "val_data")
            val_step_fn = self._validation(val, predict, shardings, mesh)
        ckpt = str(self.best_path.parent / "checkpoints") if cfg.checkpoint_every else None
        state, result = run_loop(
            state, lambda s, b, k: step(s, b, ("all",)), **source, num_epochs=cfg.epochs,
            num_batches=spe, val_step_fn=val_step_fn,
            val_data_iterator=None if val is None else [None], validate_every=cfg.validate_every,
            show_progress=False, log_every=cfg.epochs * spe + 1, recovery=self._recovery(),
            callbacks=[self._best, *self.callbacks,
                       _Reporter(cfg.epochs, cfg.print_every, self.tracker)],
            checkpoint_dir=ckpt, checkpoint_every=cfg.checkpoint_every)
        self.state, self.model = state, state.model
        self.history = self._history(result.history, state)
        return state.model, self.history

    def fit(self, train_data, val_data=None) -> History:
        """Like `train` but returns only the history (seed 003)."""
        return self.train(train_data, val_data)[1]

    def _history(self, hist: dict, state) -> History:
        h = History(train_loss=hist.get("train_loss", []), grad_norm=hist.get("train_grad_norm",
                    []), lr=hist.get("train_lr_all", []))
        for k in ("loss", "rmse", "mae", "mape", "r2"):
            h[f"val_{k}"] = hist.get(f"val_{k}", [])
        h["val_per_output_rmse"], h["val_epoch"] = self._per_output, self._best.val_epochs
        best = self._best
        h.best_epoch = best.best_epoch if best.best_epoch >= 0 else None
        h.best_val_loss = float(best.best) if best.monitor == "val_loss" and h.best_epoch \
            is not None else None
        h.stopped_epoch = best.stopped_epoch
        h.epochs_run = len(h["train_loss"])
        h.nonfinite_skipped = int(jax.device_get(state.nonfinite_count))
        h.lr_scale = float(jax.device_get(state.lr_scale))
        return h

    def predict(self, x, model=None) -> np.ndarray:
        """Predictions of ``model`` (default: the trained one) for the inputs ``x``."""
        model = self.model if model is None else model
        x = np.asarray(x, np.float32)
        return np.asarray(eqx.filter_jit(self._predictor(x))(model, jnp.asarray(x)))

    @property
    def training_state(self) -> Any:
        """Seed 004's progress record: epoch, step, best_val_loss, best_epoch, ..."""
        import types

        h = self.history or History()
        step = 0 if self.state is None else int(jax.device_get(self.state.step))
        return types.SimpleNamespace(epoch=h.epochs_run, step=step,
                                     best_val_loss=h.best_val_loss, best_epoch=h.best_epoch,
                                     nonfinite_skipped=h.nonfinite_skipped,
                                     lr_scale=h.lr_scale)
