"""The loss registry of seeds 001/003/004 and its losses: every `get_loss(name, **params)`
result is ``fn(pred, target, weights=None, *, as_ratio=False)``; see `distributed.core.losses`
for the reductions and the `Ratio` form."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .losses import _sample_weights_like
from .ratio import Ratio, ratio_or_value

LossFn = Callable[..., jnp.ndarray]
_REDUCTIONS = ("mean", "sum", "none")


def _check_number(loss, name, v, positive=True):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    if not ok or (positive and v == 0):
        rule = "> 0" if positive else ">= 0"
        raise ValueError(f"{loss}: {name} must be a number {rule}, got {name}={v!r}.")


def _check_reduction(reduction, allowed=_REDUCTIONS):
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got reduction={reduction!r}.")


def _reduce(elementwise, weights, reduction, as_ratio=False):
    """Weight per sample and reduce (see the module docstring for the exact formulas)."""
    if reduction == "mean":
        if weights is None:
            r = Ratio(jnp.sum(elementwise), elementwise.size)
        else:
            w = _sample_weights_like(weights, elementwise)
            per_sample = elementwise.size // max(elementwise.shape[0], 1)
            r = Ratio(jnp.sum(w * elementwise), jax.lax.stop_gradient(jnp.sum(w) * per_sample))
        return ratio_or_value(r, as_ratio)
    if as_ratio:
        raise ValueError(f"a loss with reduction={reduction!r} is not a mean and has no Ratio "
                         "form; use reduction='mean' to split batches exactly.")
    weighted = elementwise if weights is None else \
        _sample_weights_like(weights, elementwise) * elementwise
    return jnp.sum(weighted) if reduction == "sum" else weighted


def _elementwise_loss(name, elementwise_fn):
    def factory(reduction="mean"):
        _check_reduction(reduction)

        def loss(pred, target, weights=None, *, as_ratio=False):
            return _reduce(elementwise_fn(pred, target), weights, reduction, as_ratio)

        loss.__name__ = f"{name}_loss"
        loss.splittable = reduction == "mean"
        return loss

    return factory


def _huber(d, delta):
    a = jnp.abs(d)
    return jnp.where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta))


def huber_loss(pred, target, delta=1.0, *, as_ratio=False):
    """Mean Huber loss: `0.5 d^2` for `|d| <= delta`, else `delta (|d| - delta/2)`."""
    return _reduce(_huber(pred - target, delta), None, "mean", as_ratio)


def mae_loss(pred, target, *, as_ratio=False):
    """Mean absolute error."""
    return _reduce(jnp.abs(pred - target), None, "mean", as_ratio)


def _ape(pred, target, epsilon):
    return 100.0 * jnp.abs(pred - target) / jnp.maximum(jnp.abs(target), epsilon)


def mape_loss(pred, target, epsilon=1e-8, *, as_ratio=False):
    """Mean absolute percentage error **in percent**: `100 * mean(|p - t| / max(|t|, eps))`."""
    return _reduce(_ape(pred, target, epsilon), None, "mean", as_ratio)


def physics_informed_loss(
    residual_fn=None,
    *,
    data_weight=1.0,
    physics_weight=1.0,
    monotonicity_weight=0.0,
    smoothness_weight=0.0,
    decreasing=True,
    reduction="mean",
):
    """Build `fn(pred, target, weights=None, inputs=None)`: data MSE + physics penalties.

    `data_weight * mse + physics_weight * mean(residual_fn(pred, inputs)**2)
    + monotonicity_weight * mean(relu(±diff(pred, axis=0)))
    + smoothness_weight * mean(diff(pred, n=2, axis=0)**2)`,
    where predictions are ordered along the leading (batch/time) axis. With `decreasing=True`
    (battery state of health) increases are penalised; with False, decreases. Terms with a
    weight of 0 (or no `residual_fn`) are skipped. `reduction` applies to the data term and may
    be "mean" or "sum" ("none" has no meaning for batch-level penalties). The monotonicity and
    smoothness terms compare neighbouring rows of a batch, so a loss using them (or "sum")
    cannot be split into micro-batches: it has ``splittable = False``.
    """
    _check_reduction(reduction, ("mean", "sum"))
    if residual_fn is not None and not callable(residual_fn):
        raise TypeError(
            f"residual_fn must be callable as residual_fn(pred, inputs), got "
            f"{type(residual_fn).__name__}."
        )
    weights_ = (data_weight, physics_weight, monotonicity_weight, smoothness_weight)
    for k, v in zip(("data", "physics", "monotonicity", "smoothness"), weights_, strict=True):
        _check_number("physics_informed", f"{k}_weight", v, positive=False)

    splittable = reduction == "mean" and not monotonicity_weight and not smoothness_weight

    def loss(pred, target, weights=None, inputs=None, *, as_ratio=False):
        if as_ratio and not splittable:
            raise ValueError("this physics_informed loss compares neighbouring rows (or sums), "
                             "so it has no Ratio form; it cannot be split into micro-batches.")
        out = data_weight * _reduce(jnp.square(pred - target), weights, reduction, as_ratio)
        if residual_fn is not None and physics_weight:
            res = jnp.square(residual_fn(pred, inputs))
            out = out + physics_weight * _reduce(res, None, "mean", as_ratio)
        if monotonicity_weight and pred.shape[0] >= 2:
            d = jnp.diff(pred, axis=0)
            out = out + monotonicity_weight * jnp.mean(jnp.maximum(d if decreasing else -d, 0.0))
        if smoothness_weight and pred.shape[0] >= 3:
            out = out + smoothness_weight * jnp.mean(jnp.square(jnp.diff(pred, n=2, axis=0)))
        return out

    loss.__name__ = "physics_informed_loss"
    loss.splittable = splittable
    return loss


def _huber_factory(delta=1.0, reduction="mean", huber_delta=None):
    if huber_delta is not None:
        if delta != 1.0 and delta != huber_delta:
            raise ValueError(
                f"huber: got both delta={delta} and huber_delta={huber_delta}; pass only one."
            )
        delta = huber_delta
    _check_number("huber", "delta", delta)
    return _elementwise_loss("huber", lambda p, t: _huber(p - t, delta))(reduction)


def _mape_factory(epsilon=1e-8, reduction="mean"):
    _check_number("mape", "epsilon", epsilon)
    return _elementwise_loss("mape", lambda p, t: _ape(p, t, epsilon))(reduction)


# ---------------------------------------------------------------- registry


_REGISTRY: dict[str, Callable[..., LossFn]] = {}


def register_loss(name: str, *, overwrite: bool = False):
    """Decorator registering a loss factory `(**params) -> fn(pred, target, weights=None)`.

    A class whose `__init__` takes the params and whose instances are callable works too.

    Raises:
        ValueError: `name` is already registered and `overwrite` is False.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_loss needs a non-empty string name, got {name!r}.")

    def decorator(factory):
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"loss {name!r} is already registered; choose another name or "
                "pass register_loss(name, overwrite=True)."
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def get_loss(name: str, **params) -> LossFn:
    """Build the registered loss `name` with `params` (e.g. `get_loss("huber", delta=0.5)`).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or an invalid param value.
        TypeError: a param the loss does not take (named in the message).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; valid names: {list_losses()}.")
    factory = _REGISTRY[name]
    sig = inspect.signature(factory)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        accepted = [
            k
            for k, p in sig.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        for key in params:
            if key not in accepted:
                raise TypeError(f"loss {name!r} has no parameter {key!r}; it accepts {accepted}.")
    return factory(**params)


def list_losses() -> list[str]:
    """Sorted names of the registered losses."""
    return sorted(_REGISTRY)


register_loss("mse")(_elementwise_loss("mse", lambda p, t: jnp.square(p - t)))
register_loss("l2")(_REGISTRY["mse"])
register_loss("huber")(_huber_factory)
register_loss("mae")(_elementwise_loss("mae", lambda p, t: jnp.abs(p - t)))
register_loss("mape")(_mape_factory)
register_loss("physics_informed")(physics_informed_loss)
