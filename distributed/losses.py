"""Pure losses, regularizers, the loss registry and sample weights.

Everything here is a pure function of arrays (jit/grad safe) except `calculate_sample_weights`,
which runs once on the host with numpy. No optax, no sharding: under `jit` with sharded inputs the
means and sums below become the right collectives automatically.

Two families:

- WaveDiff losses (seed 000): `mse_loss`, `masked_mse_loss`, `weighted_masked_mse_loss`,
  `l2_opd_regularization`, `lp_regularization`, `total_loss`, `l1_schedule_rule`,
  `calculate_sample_weights`. Masks follow WaveDiff: **0 = include, 1 = exclude**.
- Registry losses (seeds 001/003/004): every `get_loss(name, **params)` result has the signature
  `fn(pred, target, weights=None) -> array`, where `weights` is an optional per-sample weight
  vector of shape `(batch,)` on the leading axis. With `reduction="mean"` the result is
  `sum_i w_i * sum_j l_ij / (n_per_sample * sum_i w_i)` (plain mean when `weights is None`),
  `"sum"` gives `sum_i w_i * sum_j l_ij`, `"none"` gives the elementwise `w_i * l_ij`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

LossFn = Callable[..., jnp.ndarray]
_REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------- WaveDiff losses (seed 000)


def mse_loss(pred, target):
    """Mean squared error over every element. Returns a scalar."""
    return jnp.mean(jnp.square(pred - target))


def masked_mse_loss(pred, target, mask):
    """Mean squared error over the included elements (mask 0 = include, 1 = exclude).

    Returns 0 (with zero gradient) when every element is excluded.
    """
    keep = 1.0 - jnp.asarray(mask, dtype=pred.dtype)
    count = jnp.sum(keep)
    total = jnp.sum(keep * jnp.square(pred - target))
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def weighted_masked_mse_loss(pred, target, mask, sample_weight):
    """Masked MSE with per-sample weights on the leading axis.

    The loss is `sum_i w_i sum_j keep_ij d_ij^2 / sum_i w_i n_i`, with `n_i` the number of
    included elements of sample `i`, so all-ones weights give exactly `masked_mse_loss`.
    Returns 0 when nothing is included (or all weights are zero).
    """
    w = _sample_weights_like(sample_weight, pred)
    keep = (1.0 - jnp.asarray(mask, dtype=pred.dtype)) * w
    denom = jnp.sum(keep)
    total = jnp.sum(keep * jnp.square(pred - target))
    return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1.0), 0.0)


def l2_opd_regularization(opd, l2_param):
    """L2 penalty on OPD maps: `l2_param * sum(opd**2) / opd.shape[0]`.

    The sum runs over every element of the `(batch, G, G)` maps and is divided by the batch size
    only (not by `G*G`), i.e. the mean over stars of each star's summed squared OPD.
    """
    return l2_param * jnp.sum(jnp.square(opd)) / opd.shape[0]


def lp_regularization(alpha, l1_rate, p=1.1):
    """Lp sparsity penalty `l1_rate * sum(|alpha|**p)` (p = 1.1 as in WaveDiff).

    Written with a double `where` so value and gradient are exactly 0 at `alpha == 0`.
    """
    if p <= 0:
        raise ValueError(f"lp_regularization needs p > 0, got p={p}; WaveDiff uses p=1.1.")
    a = jnp.abs(alpha)
    nonzero = a > 0
    safe = jnp.where(nonzero, a, 1.0)
    return l1_rate * jnp.sum(jnp.where(nonzero, safe**p, 0.0))


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def total_loss(
    model,
    positions,
    packed_seds,
    targets,
    masks,
    sample_weight=None,
    l2_param=1e-4,
    l1_rate=0.0,
):
    """Data term + L2 OPD penalty + Lp penalty on `model.alpha_mat` (WaveDiff `total_loss`).

    Protocol: `model(positions, packed_seds)` returns images shaped like `targets`;
    `model.opd(positions)` returns OPD maps `(batch, G, G)` (only called when `l2_param != 0`);
    the Lp term uses `model.alpha_mat` when the model has that attribute. `l2_param` and
    `l1_rate` may be traced arrays (so a scheduled `l1_rate` does not recompile).

    Returns:
        A scalar: `(weighted_)masked_mse + l2_opd_regularization + lp_regularization`.

    Raises:
        TypeError: `l2_param` is non-zero but the model has no `opd` method.
    """
    pred = model(positions, packed_seds)
    if sample_weight is None:
        loss = masked_mse_loss(pred, targets, masks)
    else:
        loss = weighted_masked_mse_loss(pred, targets, masks, sample_weight)
    if not _is_zero(l2_param):
        if not callable(getattr(model, "opd", None)):
            raise TypeError(
                f"total_loss: l2_param={l2_param} needs `model.opd(positions)`, which "
                f"{type(model).__name__} lacks; pass l2_param=0.0 for models without OPD maps."
            )
        loss = loss + l2_opd_regularization(model.opd(positions), l2_param)
    alpha = getattr(model, "alpha_mat", None)
    if alpha is not None and not _is_zero(l1_rate):
        loss = loss + lp_regularization(alpha, l1_rate)
    return loss


def l1_schedule_rule(epoch, l1_rate):
    """Halve `l1_rate` every 10 epochs: `l1_rate * 0.5 ** (epoch // 10)` (epoch 0-based)."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise ValueError(f"l1_schedule_rule needs a non-negative int epoch, got epoch={epoch!r}.")
    return float(l1_rate) * 0.5 ** (int(epoch) // 10)


def calculate_sample_weights(target_stars, use_sample_weights=True, masked=False, masks=None):
    """Inverse-variance per-star weights from a noise estimate, normalised by the median.

    Estimator (as WaveDiff's `NoiseEstimator`): for each `(H, W)` image, the noise sigma is
    `1.4826 * MAD` of the pixels outside a centred disc of radius `ceil(H / 3.33)` (the border,
    where the star has no flux). With `masked=True`, masked pixels (mask 1) are left out too.
    Weights are `1 / sigma**2` divided by their median, so a typical star weighs 1.

    Args:
        target_stars: `(N, H, W)` numpy or jax array of observed stars.
        use_sample_weights: if False, return None (no weighting), as WaveDiff does.
        masked: estimate the noise from unmasked border pixels only.
        masks: `(N, H, W)` masks (1 = excluded); required when `masked=True`.

    Returns:
        A float32 numpy array of shape `(N,)`, or None.

    Raises:
        ValueError: bad shapes, `masked=True` without `masks`, or an image whose noise estimate
            is zero or undefined (e.g. a noiseless image, or every border pixel masked).
    """
    if not use_sample_weights:
        return None
    imgs = np.asarray(target_stars, dtype=np.float64)
    if imgs.ndim != 3:
        raise ValueError(f"target_stars must be (N, H, W), got shape {imgs.shape}.")
    n, h, w = imgs.shape
    yy, xx = np.mgrid[:h, :w]
    radius = np.ceil(h / 3.33)
    window = np.broadcast_to(np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) > radius, imgs.shape)
    if masked:
        if masks is None:
            raise ValueError("calculate_sample_weights(masked=True) needs `masks` (1 = excluded).")
        m = np.asarray(masks)
        if m.shape != imgs.shape:
            raise ValueError(f"masks shape {m.shape} must equal target_stars shape {imgs.shape}.")
        window = window & (m == 0)
    sigma = np.full(n, np.nan)
    for i in range(n):
        px = imgs[i][window[i]]
        if px.size:
            sigma[i] = 1.4826 * np.median(np.abs(px - np.median(px)))
    bad = np.flatnonzero(~(sigma > 0))
    if bad.size:
        raise ValueError(
            f"calculate_sample_weights: noise estimate is zero or undefined for images "
            f"{bad[:10].tolist()} (noiseless, or all border pixels masked); "
            "pass use_sample_weights=False for such data."
        )
    weights = 1.0 / sigma**2
    return (weights / np.median(weights)).astype(np.float32)


# ---------------------------------------------------------------- registry losses


def _sample_weights_like(weights, pred):
    w = jnp.asarray(weights, dtype=pred.dtype)
    if w.ndim != 1 or w.shape[0] != pred.shape[0]:
        raise ValueError(
            f"per-sample weights must have shape ({pred.shape[0]},) to match the leading axis "
            f"of pred {pred.shape}, got shape {w.shape}."
        )
    return w.reshape(w.shape + (1,) * (pred.ndim - 1))


def _check_number(loss, name, v, positive=True):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    if not ok or (positive and v == 0):
        rule = "> 0" if positive else ">= 0"
        raise ValueError(f"{loss}: {name} must be a number {rule}, got {name}={v!r}.")


def _check_reduction(reduction, allowed=_REDUCTIONS):
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got reduction={reduction!r}.")


def _reduce(elementwise, weights, reduction):
    """Weight per sample and reduce (see the module docstring for the exact formulas)."""
    if weights is None:
        if reduction == "mean":
            return jnp.mean(elementwise)
        return jnp.sum(elementwise) if reduction == "sum" else elementwise
    w = _sample_weights_like(weights, elementwise)
    weighted = w * elementwise
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return jnp.sum(weighted)
    per_sample = elementwise.size // max(elementwise.shape[0], 1)
    return jnp.sum(weighted) / (jnp.sum(w) * per_sample)


def _elementwise_loss(name, elementwise_fn):
    def factory(reduction="mean"):
        _check_reduction(reduction)

        def loss(pred, target, weights=None):
            return _reduce(elementwise_fn(pred, target), weights, reduction)

        loss.__name__ = f"{name}_loss"
        return loss

    return factory


def _huber(d, delta):
    a = jnp.abs(d)
    return jnp.where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta))


def huber_loss(pred, target, delta=1.0):
    """Mean Huber loss: `0.5 d^2` for `|d| <= delta`, else `delta (|d| - delta/2)`."""
    return jnp.mean(_huber(pred - target, delta))


def mae_loss(pred, target):
    """Mean absolute error."""
    return jnp.mean(jnp.abs(pred - target))


def _ape(pred, target, epsilon):
    return 100.0 * jnp.abs(pred - target) / jnp.maximum(jnp.abs(target), epsilon)


def mape_loss(pred, target, epsilon=1e-8):
    """Mean absolute percentage error **in percent**: `100 * mean(|p - t| / max(|t|, eps))`."""
    return jnp.mean(_ape(pred, target, epsilon))


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
    be "mean" or "sum" ("none" has no meaning for batch-level penalties).
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

    def loss(pred, target, weights=None, inputs=None):
        out = data_weight * _reduce(jnp.square(pred - target), weights, reduction)
        if residual_fn is not None and physics_weight:
            out = out + physics_weight * jnp.mean(jnp.square(residual_fn(pred, inputs)))
        if monotonicity_weight and pred.shape[0] >= 2:
            d = jnp.diff(pred, axis=0)
            out = out + monotonicity_weight * jnp.mean(jnp.maximum(d if decreasing else -d, 0.0))
        if smoothness_weight and pred.shape[0] >= 3:
            out = out + smoothness_weight * jnp.mean(jnp.square(jnp.diff(pred, n=2, axis=0)))
        return out

    loss.__name__ = "physics_informed_loss"
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
