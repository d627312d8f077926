"""`Ratio`: a loss written as numerator / denominator per term, so that parts of a batch
(micro-batches, devices, evaluation chunks) combine exactly."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp


class Ratio(eqx.Module):
    """A loss as a sum of terms, each a numerator over a denominator.

    ``value = sum_k where(den[k] > 0, num[k] / den[k], 0)``. Terms are added with ``+`` (a plain
    number ``x`` is the term ``x / 1``). Micro-batches and devices combine a `Ratio` exactly by
    adding numerators and denominators term by term; denominators are data-only weights (sample
    weights, counts of unmasked elements) and carry no gradient.

    Attributes:
        num: float32 array ``(K,)`` (``(..., K)`` when stacked per example).
        den: float32 array of the same shape, ``>= 0``.
    """

    num: jax.Array
    den: jax.Array

    def __init__(self, num, den=1.0):
        self.num = jnp.atleast_1d(jnp.asarray(num, jnp.float32))
        self.den = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(den, jnp.float32)), self.num.shape)

    def __add__(self, other: Any) -> Ratio:
        other = as_ratio(other)
        return Ratio(jnp.concatenate([self.num, other.num], -1),
                     jnp.concatenate([self.den, other.den], -1))

    __radd__ = __add__

    def __mul__(self, c: Any) -> Ratio:
        """Scale every term by the number ``c`` (a loss weight)."""
        return Ratio(self.num * jnp.asarray(c, jnp.float32), self.den)

    __rmul__ = __mul__

    def value(self) -> jax.Array:
        """The scalar the ratio stands for (summed over its terms and any leading axes)."""
        num, den = self.num, self.den
        if num.ndim > 1:
            num, den = num.reshape(-1, num.shape[-1]).sum(0), den.reshape(-1, den.shape[-1]).sum(0)
        ok = den > 0
        return jnp.sum(jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0))


def as_ratio(x: Any) -> Ratio:
    """``x`` as a `Ratio`: itself, or a scalar loss as the single term ``x / 1``."""
    if isinstance(x, Ratio):
        return x
    return Ratio(jnp.reshape(jnp.asarray(x, jnp.float32), ()), 1.0)


def ratio_or_value(r: Ratio, as_ratio: bool):
    """``r`` itself, or its value (the scalar a loss returns by default)."""
    return r if as_ratio else r.value()
