"""Pure losses, regularizers and sample weights (the registry is `distributed.core.registry`).

Everything here is a pure function of arrays (jit/grad safe) except `calculate_sample_weights`,
which runs once on the host with numpy. No optax, no sharding: under `jit` with sharded inputs the
means and sums below become the right collectives automatically.

Two families:

- WaveDiff losses (seed 000): `mse_loss`, `masked_mse_loss`, `weighted_masked_mse_loss`,
  `l2_opd_regularization`, `lp_regularization`, `total_loss`, `l1_schedule_rule`,
  `calculate_sample_weights`. Masks follow WaveDiff: **0 = include, 1 = exclude**.
- Registry losses (seeds 001/003/004): every `get_loss(name, **params)` result has the signature
  `fn(pred, target, weights=None, *, as_ratio=False) -> array`, where `weights` is an optional
  per-sample weight vector of shape `(batch,)` on the leading axis. With `reduction="mean"` the
  result is `sum_i w_i * sum_j l_ij / (n_per_sample * sum_i w_i)` (plain mean when `weights is
  None`), `"sum"` gives `sum_i w_i * sum_j l_ij`, `"none"` gives the elementwise `w_i * l_ij`.

Every loss that is a mean (of examples, of unmasked elements, weighted or not) can also return
its numerator and denominator, `as_ratio=True` -> `Ratio`, so that micro-batches and devices are
combined exactly (`sum of numerators / sum of denominators`, not a mean of ratios): gradient
accumulation then changes memory only. A loss that cannot be split into parts of a batch (e.g.
penalties on neighbouring rows) carries the attribute ``splittable = False``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .ratio import Ratio, ratio_or_value


def takes_argument(fn: Callable, name: str, nth_positional: int | None = None) -> bool:
    """Whether ``fn`` accepts the argument ``name`` by keyword (or ``**kwargs``), or, with
    ``nth_positional``, at least that many + 1 positional arguments."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.name == name and p.kind is not p.POSITIONAL_ONLY for p in params):
        return True
    if any(p.kind is p.VAR_KEYWORD for p in params) and nth_positional is None:
        return True
    if nth_positional is None:
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) > nth_positional or any(p.kind is p.VAR_POSITIONAL for p in params)



def _sample_weights_like(weights, pred):
    w = jnp.asarray(weights, dtype=pred.dtype)
    if w.ndim != 1 or w.shape[0] != pred.shape[0]:
        raise ValueError(
            f"per-sample weights must have shape ({pred.shape[0]},) to match the leading axis "
            f"of pred {pred.shape}, got shape {w.shape}."
        )
    return w.reshape(w.shape + (1,) * (pred.ndim - 1))


# ---------------------------------------------------------------- WaveDiff losses (seed 000)


def mse_loss(pred, target, *, as_ratio=False):
    """Mean squared error over every element. Returns a scalar (or its `Ratio`)."""
    return ratio_or_value(Ratio(jnp.sum(jnp.square(pred - target)), pred.size), as_ratio)


def masked_mse_loss(pred, target, mask, *, as_ratio=False):
    """Mean squared error over the included elements (mask 0 = include, 1 = exclude).

    Returns 0 (with zero gradient) when every element is excluded.
    """
    keep = 1.0 - jnp.asarray(mask, dtype=pred.dtype)
    r = Ratio(jnp.sum(keep * jnp.square(pred - target)), jax.lax.stop_gradient(jnp.sum(keep)))
    return ratio_or_value(r, as_ratio)


def weighted_masked_mse_loss(pred, target, mask, sample_weight, *, as_ratio=False):
    """Masked MSE with per-sample weights on the leading axis.

    The loss is `sum_i w_i sum_j keep_ij d_ij^2 / sum_i w_i n_i`, with `n_i` the number of
    included elements of sample `i`, so all-ones weights give exactly `masked_mse_loss`.
    Returns 0 when nothing is included (or all weights are zero).
    """
    w = _sample_weights_like(sample_weight, pred)
    keep = (1.0 - jnp.asarray(mask, dtype=pred.dtype)) * w
    r = Ratio(jnp.sum(keep * jnp.square(pred - target)), jax.lax.stop_gradient(jnp.sum(keep)))
    return ratio_or_value(r, as_ratio)


def l2_opd_regularization(opd, l2_param, *, as_ratio=False):
    """L2 penalty on OPD maps: `l2_param * sum(opd**2) / opd.shape[0]`.

    The sum runs over every element of the `(batch, G, G)` maps and is divided by the batch size
    only (not by `G*G`), i.e. the mean over stars of each star's summed squared OPD.
    """
    return ratio_or_value(Ratio(l2_param * jnp.sum(jnp.square(opd)), opd.shape[0]), as_ratio)


def lp_regularization(alpha, l1_rate, p=1.1, *, as_ratio=False):
    """Lp sparsity penalty `l1_rate * sum(|alpha|**p)` (p = 1.1 as in WaveDiff).

    Written with a double `where` so value and gradient are exactly 0 at `alpha == 0`. A
    function of the parameters only: as a `Ratio` it is one term over 1, the same in every
    micro-batch.
    """
    if p <= 0:
        raise ValueError(f"lp_regularization needs p > 0, got p={p}; WaveDiff uses p=1.1.")
    a = jnp.abs(alpha)
    nonzero = a > 0
    safe = jnp.where(nonzero, a, 1.0)
    return ratio_or_value(Ratio(l1_rate * jnp.sum(jnp.where(nonzero, safe**p, 0.0))), as_ratio)


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
    *,
    as_ratio=False,
):
    """Data term + L2 OPD penalty + Lp penalty on `model.alpha_mat` (WaveDiff `total_loss`).

    Protocol: `model(positions, packed_seds)` returns images shaped like `targets`;
    `model.opd(positions)` returns OPD maps `(batch, G, G)` (only called when `l2_param != 0`);
    the Lp term uses `model.alpha_mat` when the model has that attribute. `l2_param` and
    `l1_rate` may be traced arrays (so a scheduled `l1_rate` does not recompile).

    Returns:
        A scalar: `(weighted_)masked_mse + l2_opd_regularization + lp_regularization` (with
        ``as_ratio``, the `Ratio` of those terms).

    Raises:
        TypeError: `l2_param` is non-zero but the model has no `opd` method.
    """
    pred = model(positions, packed_seds)
    if sample_weight is None:
        loss = masked_mse_loss(pred, targets, masks, as_ratio=True)
    else:
        loss = weighted_masked_mse_loss(pred, targets, masks, sample_weight, as_ratio=True)
    if not _is_zero(l2_param):
        if not callable(getattr(model, "opd", None)):
            raise TypeError(
                f"total_loss: l2_param={l2_param} needs `model.opd(positions)`, which "
                f"{type(model).__name__} lacks; pass l2_param=0.0 for models without OPD maps."
            )
        loss = loss + l2_opd_regularization(model.opd(positions), l2_param, as_ratio=True)
    alpha = getattr(model, "alpha_mat", None)
    if alpha is not None and not _is_zero(l1_rate):
        loss = loss + lp_regularization(alpha, l1_rate, as_ratio=True)
    return ratio_or_value(loss, as_ratio)


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
