"""The config-driven `Trainer` of seeds 001/003/004, a thin layer over the engine and `run_loop`.

``Trainer(model, config).train(train_data, val_data) -> (model, history)``: the model trains
data-parallel over a mesh (default: all devices) with the sharded `TrainStep`; the engine's
Grain stream orders the examples (every example every epoch); validation runs every
``validate_every`` epochs on every validation row, in inference mode, and `compute_metrics`
turns its predictions into ``val_rmse`` / ``val_mae`` / ``val_mape`` / ``val_r2``. Models whose
``__call__`` takes ``key=`` (dropout, noise) get a fresh key per step (one per example when the
model is called per example). Early stopping restores the best model; ``save_best`` writes it in
the single-file format; non-finite updates are skipped in the step and loss explosions roll back
with a lower LR.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..core import bcd
from ..core.clock import EpochClock
from ..core.losses import takes_argument
from ..core.metrics import compute_metrics
from ..core.optim import OptimizerConfig, make_optimizer
from ..core.registry import get_loss
from ..core.step import StepOptions
from ..data import to_global
from ..engine import Task, build
from ..loop import Callback, Checkpointer, EarlyStopping, RecoveryPolicy, run_loop
from . import ensemble as ens
from .cycle import default_mesh
from .history import History
from .trainer_data import as_arrays
from .training_config import TrainingConfig

log = logging.getLogger(__name__)


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
            text = " ".join(f"{k}={v:.4g}" for k, v in shown.items() if "_member" not in k)
            print(f"epoch {epoch + 1}/{self.epochs}: {text}", flush=True)
        if self.tracker is not None and hasattr(self.tracker, "log_metrics"):
            self.tracker.log_metrics(dict(shown), step=epoch)


class _Predictor:
    """``model(x)`` for a batch: per example (``jax.vmap``) when ``model(x[0])`` works (e.g.
    ``eqx.nn.MLP``), else on the batch; with ``key=`` for models that take one."""

    def __init__(self, model: Any, x0: np.ndarray):
        self.takes_key = takes_argument(model, "key")
        kw = {"key": jax.random.key(0)} if self.takes_key else {}
        try:
            eqx.filter_eval_shape(lambda m, x: m(x, **kw), model, jnp.asarray(x0[0]))
            self.per_example = True
        except Exception:  # noqa: BLE001 - not a per-example model: call it on the batch
            self.per_example = False

    def __call__(self, model: Any, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if not self.takes_key:
            return jax.vmap(model)(x) if self.per_example else model(x)
        if not self.per_example:
            return model(x, key=key)
        if key is None:
            return jax.vmap(lambda xi: model(xi, key=None))(x)
        keys = jax.random.split(key, x.shape[0])
        return jax.vmap(lambda xi, ki: model(xi, key=ki))(x, keys)


def _optimizer(cfg: TrainingConfig, custom: optax.GradientTransformation | None, updates: int,
               clock: EpochClock, sweepable: bool = False) -> optax.GradientTransformation:
    """The given optimizer, or the config's; its schedule spans ``updates`` steps (epoch-based
    settings count ``clock``'s steps per epoch)."""
    if custom is not None:
        if cfg.gradient_clip or cfg.grad_clip_norm:
            log.warning("Trainer: a custom optimizer is used as given; the config's "
                        "gradient_clip / grad_clip_norm are ignored (add optax.clip to it).")
        return custom
    spe = max(1, round(clock.steps_per_epoch))
    return make_optimizer(OptimizerConfig(
        name=cfg.optimizer, learning_rate=cfg.learning_rate, schedule=cfg.scheduler,
        warmup_steps=cfg.warmup_steps, total_steps=max(updates, cfg.warmup_steps + 1),
        T0=None if not cfg.scheduler_T0 else cfg.scheduler_T0 * spe,
        decay_rate=cfg.decay_rate, transition_steps=spe,
        weight_decay=cfg.weight_decay, grad_clip_norm=cfg.grad_clip_norm,
        grad_clip_value=cfg.gradient_clip), sweepable=sweepable)


def _recovery(cfg: TrainingConfig) -> RecoveryPolicy | None:
    if not cfg.explosion_factor and cfg.loss_explosion_threshold is None:
        return None
    return RecoveryPolicy(explosion_factor=cfg.explosion_factor,
                          threshold=cfg.loss_explosion_threshold or math.inf,
                          max_retries=cfg.max_retries, lr_reduction=cfg.lr_reduction,
                          window=10, snapshot_every=5)


class Trainer:
    """Config-driven training over the engine and `run_loop` (seeds 001/003/004).

    Args:
        model: an Equinox model, or ``key -> model`` (needed by ``config.ensemble`` / ``sweep``;
            the trained ensemble holds every member on a leading axis). Called per example
            (``jax.vmap``) when ``model(x[0])`` works (e.g. ``eqx.nn.MLP``), else on the batch.
            A ``__call__`` taking ``key=`` gets a fresh PRNG key each step (per example: split
            from the step's key); evaluation and `predict` run it in inference mode.
        config: a `TrainingConfig` or a plain dict of its fields.
        optimizer: an optax transformation used as given (else built from the config).
        callbacks: `Callback` objects (``on_epoch_end(epoch, metrics)`` ...).
        mesh: device mesh (default: all devices, data parallel).
        loss_fn: ``(pred, target[, weights][, inputs=x]) -> scalar``, replacing the config's
            registry loss (a mean over the batch's examples, or with ``as_ratio=`` a
            `distributed.Ratio`). ``loss_config={"name": ..., **params}`` picks a registry loss.
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
        self.members = ens.members(config, model, optimizer)
        self._factory = model if ens.is_factory(model) else None
        self.callbacks, self.mesh, self.tracker = list(callbacks), mesh, tracker
        self.filter_spec = filter_spec
        if loss_fn is None:
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
    def _compute_dtype(self) -> str | None:
        if self.config.compute_dtype is not None:
            return None if self.config.compute_dtype == "float32" else self.config.compute_dtype
        if self.config.use_amp and jax.default_backend() != "cpu":
            return "bfloat16"
        return None  # AMP is off on CPU (as seed 003 turns it off without CUDA)

    def _losses(self, predict: _Predictor) -> tuple[Callable, Callable]:
        """The training loss ``(model, batch[, key]) -> Ratio`` and the per-example metrics."""
        base = self.loss_fn
        takes_weights = takes_argument(base, "weights", 2)
        takes_inputs = takes_argument(base, "inputs")
        splittable = getattr(base, "splittable", True)
        kw_ratio = {"as_ratio": True} if splittable and takes_argument(base, "as_ratio") else {}

        def of_pred(pred, batch):
            kwargs = {"inputs": batch["x"], **kw_ratio} if takes_inputs else dict(kw_ratio)
            if "weights" in batch:
                if not takes_weights:
                    raise ValueError("the data have sample weights but the loss function takes "
                                     "no `weights` argument.")
                return base(pred, batch["y"], batch["weights"], **kwargs)
            return base(pred, batch["y"], **kwargs)

        def metric(model, batch):
            pred = predict(model, batch["x"])
            return {"loss": of_pred(pred, batch), "pred": pred}

        if predict.takes_key:
            def loss(model, batch, *, key):
                return of_pred(predict(model, batch["x"], key), batch)
        else:
            def loss(model, batch):
                return of_pred(predict(model, batch["x"]), batch)

        loss.splittable = metric.splittable = splittable
        return loss, metric

    def _fit_targets(self, data: dict, out_shape: tuple, what: str) -> dict:
        y = data["y"]
        if y.shape[1:] != out_shape:
            if math.prod(y.shape[1:]) != math.prod(out_shape):
                raise ValueError(f"{what}: targets have shape {y.shape[1:]} per example but the "
                                 f"model outputs {out_shape}.")
            data = dict(data, y=y.reshape(len(y), *out_shape))
        return data

    def validate(self, model) -> dict[str, float]:
        """Validation metrics of ``model`` (or a `TrainState`) on every row of the running
        `train` call's ``val_data``: ``loss`` (the training loss) and `compute_metrics`'
        ``rmse``, ``mae``, ``mape``, ``r2`` (per-output RMSE goes to
        ``history["val_per_output_rmse"]``). Called at each validation epoch."""
        scores, outs = self._evaluator.evaluate(model)
        y = self._val["y"]
        n = len(y)
        flat = (lambda a: a.reshape(n)) if y.size == n else (lambda a: a.reshape(n, -1))
        pred = outs["pred"] if self.members is None else outs["pred"].mean(0)  # ensemble mean
        m = compute_metrics(flat(y), flat(pred), self.config.output_names)
        self._last_val = m
        self._per_output.append({k: float(v) for k, v in m["per_output_rmse"].items()})
        self._best.validated = True
        members = {k: v for k, v in scores.items() if k.startswith("loss_member")}
        return {"loss": scores["loss"], **{k: float(m[k]) for k in ("rmse", "mae", "mape", "r2")},
                **members}

    def _evaluate(self, state) -> dict[str, float]:
        self._best._state = state
        return self.validate(state)

    def _save_best(self, model, epoch: int, metrics: dict) -> None:
        from ..checkpoint.model_file import make_metadata, save_checkpoint

        val_loss = metrics.get("val_loss")
        meta = make_metadata(step=self._clock.steps(epoch + 1),
                             epoch=epoch + 1, train_loss=metrics.get("train_loss"),
                             val_loss=val_loss,
                             per_output_rmse=self._last_val.get("per_output_rmse"),
                             config=self.config.to_dict())
        meta["training"]["test_loss"] = meta["training"]["val_loss"]
        meta.update(ens.header(self.members))  # an ensemble: every member, stacked
        save_checkpoint(model, self.best_path, meta)

    # -- training -----------------------------------------------------------------------------
    def train(self, train_data, val_data=None) -> tuple[Any, History]:
        """Train; returns ``(model, history)``. See `as_arrays` for the accepted data forms;
        ``train_data`` may also be a zero-argument callable returning an iterator of (x, y)
        batches for one epoch (streamed as given, no shuffling; called once more to count)."""
        cfg, mesh = self.config, default_mesh(self.mesh)
        stream = callable(train_data) and not hasattr(train_data, "__iter__")
        if stream:
            batches = [as_arrays([b], "train_data") for b in train_data()]
            if not batches:
                raise ValueError("train_data() yielded no batches.")
            sample, batch_size = batches[0], len(batches[0]["x"])
            clock = EpochClock(len(batches), 1)
        else:
            sample = as_arrays(train_data, "train_data")
            batch_size, clock = cfg.batch_size, None
        task_model, probe = ens.task_models(self._factory or self.model, self.members, cfg.seed)
        predict = _Predictor(probe, sample["x"])
        out_shape = eqx.filter_eval_shape(
            lambda m, x: predict(m, x, jax.random.key(0)), probe,
            jnp.asarray(sample["x"][:1])).shape[1:]
        loss, metric = self._losses(predict)
        if "weights" in sample and not takes_argument(self.loss_fn, "weights", 2):
            raise ValueError("the data have sample weights but the loss function takes no "
                             "`weights` argument.")
        val = as_arrays(val_data, "val_data")
        if val is not None:
            val = self._fit_targets(val, out_shape, "val_data")
        task = Task(model=task_model, loss_fn=loss, train=self._fit_targets(
            sample, out_shape, "train_data"), val=val,
            plan=bcd.single_phase_plan(cfg.epochs, ("all",)),
            blocks={"all": self.filter_spec if self.filter_spec is not None
                    else bcd.complete_filter(probe)},
            optimizers=lambda updates: {"all": _optimizer(
                cfg, self.optimizer, updates["all"],
                clock or EpochClock(len(sample["x"]), cfg.batch_size), bool(cfg.sweep))},
            metric_fn=metric, outputs=("pred",))
        try:
            engine = build(task, mesh=mesh, batch_size=batch_size, seed=cfg.seed,
                           key=jax.random.key(cfg.seed), shuffle=cfg.shuffle,
                           options=StepOptions(compute_dtype=self._compute_dtype()),
                           with_data=not stream, eval_batch_size=max(cfg.batch_size, 256),
                           device_data=cfg.device_data,
                           ensemble=self.members)
        except ValueError as e:
            field = "TrainingConfig.batch_size" if "batch" in str(e) else "Trainer"
            raise ValueError(f"{field}: {e}") from None
        self._clock = clock or engine.clock
        source: dict[str, Any] = {"data_iterator": engine.data}
        if stream:
            def epoch_batches():
                for b in train_data():
                    yield to_global(self._fit_targets(as_arrays([b], "train_data"), out_shape,
                                                      "train_data"), mesh)
            source = {"data_iterator_fn": epoch_batches}
        self._val, self._evaluator = val, engine.evaluator
        patience = cfg.early_stopping_patience if cfg.early_stopping else None
        self._best = _Best(self, "val_loss" if val is not None else "train_loss", patience)
        self._per_output, self._last_val = [], {}
        ckpt = None if not cfg.checkpoint_every else Checkpointer(
            self.best_path.parent / "checkpoints", every_epochs=cfg.checkpoint_every,
            data_iterator=engine.data)
        try:
            state, result = run_loop(
                engine.state, engine.step_fn, **source, num_epochs=cfg.epochs,
                clock=self._clock, evaluate=None if val is None else self._evaluate,
                validate_every=cfg.validate_every, show_progress=False,
                log_every=self._clock.steps(cfg.epochs) + 1, recovery=_recovery(cfg),
                callbacks=[self._best, *self.callbacks,
                           _Reporter(cfg.epochs, cfg.print_every, self.tracker)],
                checkpointer=ckpt)
        finally:
            if ckpt is not None:
                ckpt.close()
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
        h.update({k: v for k, v in hist.items() if "_member" in k})  # ensembles, per member
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
        """Predictions of ``model`` (default: the trained one) for the inputs ``x``, in
        inference mode (dropout off); of an ensemble: the mean over its members."""
        model = eqx.nn.inference_mode(self.model if model is None else model)
        x = np.asarray(x, np.float32)
        if self.members is None:
            return np.asarray(eqx.filter_jit(_Predictor(model, x))(model, jnp.asarray(x)))
        one = _Predictor(ens.single(self._factory, 0), x)
        fn = eqx.filter_vmap(one, in_axes=(eqx.if_array(0), None))
        return np.asarray(eqx.filter_jit(fn)(model, jnp.asarray(x))).mean(0)

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
