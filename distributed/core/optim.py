"""Optimizer factory: typed config -> optax schedules and `optax.chain` transformations.

`make_optimizer(cfg)` returns `optax.chain(clip..., inject_hyperparams(core)(learning_rate=
schedule))`, so the learning rate used by the latest update is stored in the optimizer state and
read back with `current_learning_rate(opt_state)` (no host callback, no re-computation).
Nothing here names model fields; per-block optimizers for BCD are plain dicts of transformations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

OptimizerName = Literal["adam", "adamw", "sgd"]
ScheduleName = Literal["constant", "cosine", "exponential", "linear", "cosine_warm_restarts"]
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "exponential", "linear", "cosine_warm_restarts")


def configure_optimizer(lr=1e-3, b1=0.9, b2=0.999, eps=1e-7) -> optax.GradientTransformation:
    """Adam with TensorFlow/Keras defaults (`eps=1e-7`), as WaveDiff's `configure_optimizer`.

    Numerically identical to `optax.adam(lr, b1, b2, eps)` (`lr` may be an optax schedule);
    wrapped in `optax.inject_hyperparams` so `current_learning_rate(opt_state)` returns `lr`.
    """
    if not callable(lr):
        _check_positive("lr", lr)
    return optax.inject_hyperparams(lambda learning_rate: optax.adam(learning_rate, b1, b2, eps))(
        learning_rate=lr
    )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer, which learning-rate schedule, which clipping. Validated on creation."""

    name: OptimizerName = "adam"
    learning_rate: float = 1e-3
    """Peak learning rate (reached after `warmup_steps`)."""
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-7
    """Adam epsilon; TF default 1e-7 (optax's own default is 1e-8)."""
    momentum: float = 0.0
    """SGD momentum; 0 = plain SGD."""
    nesterov: bool = False
    weight_decay: float = 0.0
    """adamw: decoupled decay. adam/sgd: coupled L2 (`add_decayed_weights` before the update,
    as PyTorch's `weight_decay`). 0 = off."""
    schedule: ScheduleName = "constant"
    warmup_steps: int = 0
    """Linear warmup from 0 to `learning_rate`, before any schedule."""
    total_steps: int | None = None
    """cosine/linear: steps of the whole schedule *including* warmup (required for them)."""
    alpha: float = 0.0
    """Final learning rate as a fraction of `learning_rate` (cosine, linear, warm restarts; a
    floor for exponential when > 0). A fraction, so it scales with per-block learning rates."""
    decay_rate: float = 0.96
    """exponential: lr = learning_rate * decay_rate ** (t / transition_steps)."""
    transition_steps: int = 1
    T0: int | None = None
    """cosine_warm_restarts: first period (steps); required for that schedule."""
    T_mult: int = 2
    """cosine_warm_restarts: period growth; periods are T0, T0*T_mult, T0*T_mult**2, ..."""
    grad_clip_norm: float | None = None
    """Clip the global gradient norm to this value; None or 0 = off."""
    grad_clip_value: float | None = None
    """Clip each gradient element to [-v, v]; None or 0 = off."""

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(
                f"OptimizerConfig.name must be one of {OPTIMIZERS}, got {self.name!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"OptimizerConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}."
            )
        _check_positive("learning_rate", self.learning_rate)
        _check_positive("eps", self.eps)
        for k in ("b1", "b2", "momentum"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"OptimizerConfig.{k} must be in [0, 1), got {k}={v!r}.")
        if not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"OptimizerConfig.alpha must be in [0, 1], got alpha={self.alpha!r}.")
        for k in ("weight_decay", "grad_clip_norm", "grad_clip_value"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, (int, float)) or not v >= 0):
                raise ValueError(f"OptimizerConfig.{k} must be >= 0 (0/None = off), got {k}={v!r}.")
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        _check_int("transition_steps", self.transition_steps, minimum=1)
        _check_int("T_mult", self.T_mult, minimum=1)
        _check_positive("decay_rate", self.decay_rate)
        if self.schedule in ("cosine", "linear"):
            if self.total_steps is None:
                raise ValueError(
                    f"schedule={self.schedule!r} needs total_steps (the schedule "
                    "length including warmup); set OptimizerConfig(total_steps=...)."
                )
            _check_int("total_steps", self.total_steps, minimum=self.warmup_steps + 1)
        if self.schedule == "cosine_warm_restarts":
            if self.T0 is None:
                raise ValueError(
                    "schedule='cosine_warm_restarts' needs T0 (the first period in "
                    "steps); set OptimizerConfig(T0=...)."
                )
            _check_int("T0", self.T0, minimum=1)


def _check_positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number > 0, got {name}={v!r}.")


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {name}={v!r}.")


def warm_restarts_schedule(init_value, T0, T_mult=2, end_value=0.0) -> optax.Schedule:
    """Cosine annealing with warm restarts (SGDR, PyTorch `CosineAnnealingWarmRestarts`).

    Period `i` lasts `T0 * T_mult**i` steps; within it the value falls from `init_value` to
    `end_value` along a half cosine, then jumps back to `init_value`. Unlike
    `optax.sgdr_schedule` the number of restarts is unbounded.
    """
    _check_int("T0", T0, minimum=1)
    _check_int("T_mult", T_mult, minimum=1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        if T_mult == 1:
            n = jnp.floor(step / T0)
        else:
            n = jnp.floor(jnp.log1p(step * (T_mult - 1) / T0) / math.log(T_mult))
            start = lambda k: T0 * (T_mult**k - 1) / (T_mult - 1)  # noqa: E731
            # Guard the float log against off-by-one at exact period boundaries.
            n = jnp.where(start(n + 1) <= step, n + 1, jnp.where(start(n) > step, n - 1, n))
        if T_mult == 1:
            t_cur, period = step - n * T0, jnp.float32(T0)
        else:
            t_cur, period = step - T0 * (T_mult**n - 1) / (T_mult - 1), T0 * T_mult**n
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * t_cur / period))
        return end_value + (init_value - end_value) * cos

    return schedule


def make_schedule(cfg: OptimizerConfig, peak: float | jax.Array | None = None) -> optax.Schedule:
    """The learning-rate schedule of `cfg` (step -> lr), warmup included.

    ``peak`` replaces ``cfg.learning_rate`` (it may be a traced float32 scalar: an ensemble
    member's own rate, `make_optimizer(cfg, sweepable=True)`).
    """
    lr = cfg.learning_rate if peak is None else peak
    end = cfg.alpha * lr
    w = cfg.warmup_steps
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, cfg.total_steps - w, alpha=cfg.alpha)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, end, cfg.total_steps - w)
    elif cfg.schedule == "exponential":
        main = optax.exponential_decay(
            lr, cfg.transition_steps, cfg.decay_rate, end_value=end if cfg.alpha > 0 else None
        )
    else:
        main = warm_restarts_schedule(lr, cfg.T0, cfg.T_mult, end)
    if w == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, w), main], [w])


def _core(cfg: OptimizerConfig, learning_rate, weight_decay, decay: bool
          ) -> optax.GradientTransformation:
    """adam / adamw / sgd at ``learning_rate``; coupled L2 for adam/sgd when ``decay``."""
    if cfg.name == "adamw":
        return optax.adamw(learning_rate, cfg.b1, cfg.b2, cfg.eps, weight_decay=weight_decay)
    if cfg.name == "adam":
        tx = optax.adam(learning_rate, cfg.b1, cfg.b2, cfg.eps)
    else:
        tx = optax.sgd(learning_rate, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    if decay:
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx


def make_optimizer(cfg: OptimizerConfig, *, sweepable: bool = False
                   ) -> optax.GradientTransformation:
    """`optax.chain(clip_by_global_norm?, clip?, inject_hyperparams(core)(schedule))`.

    Clipping happens first, on the raw gradients. The core is `optax.adam`, `optax.adamw`
    (decoupled weight decay) or `optax.sgd`; for adam/sgd a non-zero `weight_decay` adds
    `optax.add_decayed_weights` before the update (coupled L2).

    ``sweepable=True`` keeps the peak learning rate and the weight decay as numbers in the
    optimizer state (`SweepState.sweep`) instead of constants of the transformation, so that
    the members of an ensemble can each hold their own (`distributed.core.ensemble`); the
    schedule is applied to the stored peak at every update. With the same values it updates
    exactly as ``sweepable=False`` (adam/sgd always add the decay term, ``+ 0 * params`` at 0).
    """
    if not isinstance(cfg, OptimizerConfig):
        raise TypeError(f"make_optimizer needs an OptimizerConfig, got {type(cfg).__name__}.")
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    if cfg.grad_clip_value:
        parts.append(optax.clip(cfg.grad_clip_value))
    if sweepable:
        parts.append(_sweepable(cfg))
    else:
        core = lambda learning_rate: _core(  # noqa: E731
            cfg, learning_rate, cfg.weight_decay, bool(cfg.weight_decay))
        parts.append(optax.inject_hyperparams(core)(learning_rate=make_schedule(cfg)))
    return optax.chain(*parts)


SWEEPABLE = ("learning_rate", "weight_decay")
"""The settings a sweepable optimizer keeps in its state (`SweepState.sweep`)."""


class SweepState(NamedTuple):
    """State of a sweepable optimizer (`make_optimizer(cfg, sweepable=True)`).

    Attributes:
        count: int32 scalar, updates so far.
        hyperparams: ``{"learning_rate": float32 scalar}``, the rate the latest update used
            (what `current_learning_rate` reads).
        sweep: ``{"learning_rate": peak rate, "weight_decay": decay}``, float32 scalars read at
            every update (one per member in an ensemble).
        inner_state: the core optimizer's state.
    """

    count: jax.Array
    hyperparams: dict[str, jax.Array]
    sweep: dict[str, jax.Array]
    inner_state: Any


def _sweepable(cfg: OptimizerConfig) -> optax.GradientTransformation:
    def settings(count, sweep):
        lr = jnp.asarray(make_schedule(cfg, peak=sweep["learning_rate"])(count), jnp.float32)
        return lr, _core(cfg, lr, sweep["weight_decay"], cfg.name != "adamw")

    def init(params):
        sweep = {k: jnp.asarray(getattr(cfg, k), jnp.float32) for k in SWEEPABLE}
        count = jnp.zeros([], jnp.int32)
        lr, core = settings(count, sweep)
        return SweepState(count, {"learning_rate": lr}, sweep, core.init(params))

    def update(updates, state, params=None):
        lr, core = settings(state.count, state.sweep)
        updates, inner = core.update(updates, state.inner_state, params)
        return updates, SweepState(optax.safe_increment(state.count), {"learning_rate": lr},
                                   state.sweep, inner)

    return optax.GradientTransformation(init, update)


def current_learning_rate(opt_state):
    """The learning rate used by the latest update (at init: the step-0 value), or None.

    Searches `opt_state` for the first `optax.inject_hyperparams` state holding a
    `learning_rate` (works through `chain`, `masked`, `partition`, ...). Jit-safe; returns
    a scalar array.
    """
    # Duck-typed: optax has both `InjectHyperparamsState` and `InjectStatefulHyperparamsState`.
    is_inject = lambda x: (
        isinstance(getattr(x, "hyperparams", None), dict)
        and hasattr(  # noqa: E731
            x, "inner_state"
        )
    )
    for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=is_inject):
        if is_inject(leaf) and "learning_rate" in leaf.hyperparams:
            return leaf.hyperparams["learning_rate"]
    return None


def per_block_optimizers(
    block_lrs: dict[str, float], base: OptimizerConfig
) -> dict[str, optax.GradientTransformation]:
    """One optimizer per BCD block, `base` with each block's learning rate.

    E.g. `per_block_optimizers({"param": 1e-2, "nonparam": 1e-1}, OptimizerConfig())`.
    """
    if not isinstance(block_lrs, dict) or not block_lrs:
        raise TypeError(
            f"block_lrs must be a non-empty dict name -> learning rate, got {block_lrs!r}."
        )
    if not isinstance(base, OptimizerConfig):
        raise TypeError(f"base must be an OptimizerConfig, got {type(base).__name__}.")
    out = {}
    for block, lr in block_lrs.items():
        try:
            cfg = dataclasses.replace(base, learning_rate=lr)
        except ValueError as e:
            raise ValueError(f"block {block!r}: {e}") from None
        out[block] = make_optimizer(cfg)
    return out
