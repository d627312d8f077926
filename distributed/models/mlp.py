"""A batched multi-layer perceptron for tabular data."""

import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "swish": jax.nn.swish,
    "sigmoid": jax.nn.sigmoid,
    "identity": lambda x: x,
}
"""Activation names accepted by `MLP` (stored by name, so the model stays JSON-describable)."""


@functools.partial(jax.jit, static_argnums=1)
def _init_arrays(key: PRNGKeyArray, sizes: tuple[int, ...]) -> list[tuple[Array, Array]]:
    """`eqx.nn.Linear`'s init, U(-1/sqrt(in), 1/sqrt(in)), from ONE uniform draw (each threefry
    call costs seconds of XLA CPU compile time)."""
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    flat = jax.random.uniform(key, (sum(o * (i + 1) for i, o in pairs),), minval=-1.0, maxval=1.0)
    out, start = [], 0
    for i, o in pairs:
        wb = flat[start:start + o * (i + 1)].reshape(o, i + 1) / math.sqrt(i)
        out.append((wb[:, :i], wb[:, i]))
        start += o * (i + 1)
    return out


def _activation(name: str | None, arg: str) -> None:
    if name is not None and name not in ACTIVATIONS:
        raise ValueError(f"Unknown {arg}={name!r}; choose one of {sorted(ACTIVATIONS)}"
                         f"{' or None' if arg == 'final_activation' else ''}.")


class MLP(eqx.Module):
    """A multi-layer perceptron applied to a batch: `(..., in_size) -> (..., out_size)`.

    `layers[i].weight` has shape (out, in), as in `eqx.nn.Linear`, so sharding rules can address
    it (tensor parallel: shard hidden widths; keep them divisible by the mesh axis, e.g. by 8).

    **Arguments:**

    - `in_size`, `out_size`: input and output feature counts.
    - `width_size`: hidden width. `depth`: number of hidden layers (0 = a single linear map).
    - `key`: PRNG key (keyword-only).
    - `activation`: hidden activation name, one of `ACTIVATIONS`.
    - `final_activation`: activation on the output, or None for a linear head.
    - `dropout`: dropout rate after each hidden activation (`eqx.nn.Dropout`; 0 = none). With
      a rate > 0, calls in training mode need `key=`; `eqx.nn.inference_mode(model)` turns it
      off.

    !!! Example
        ```python
        model = MLP(8, 1, 64, 2, key=jax.random.key(0))
        y = model(jnp.ones((32, 8)))  # (32, 1)
        ```
    """

    layers: tuple[eqx.nn.Linear, ...]
    in_size: int = eqx.field(static=True)
    out_size: int = eqx.field(static=True)
    width_size: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    activation: str = eqx.field(static=True)
    final_activation: str | None = eqx.field(static=True)
    dropout: eqx.nn.Dropout

    def __init__(
        self,
        in_size: int,
        out_size: int,
        width_size: int,
        depth: int,
        *,
        key: PRNGKeyArray,
        activation: str = "relu",
        final_activation: str | None = None,
        dropout: float = 0.0,
    ):
        for name, v in (("in_size", in_size), ("out_size", out_size), ("width_size", width_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={v!r}.")
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth (hidden layers) must be an integer >= 0, got depth={depth!r}.")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or \
                not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a rate in [0, 1), got dropout={dropout!r}.")
        _activation(activation, "activation")
        _activation(final_activation, "final_activation")
        sizes = (in_size,) + (width_size,) * depth + (out_size,)
        arrays = _init_arrays(key, sizes)
        abstract = [eqx.filter_eval_shape(eqx.nn.Linear, a, b, key=key)
                    for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        self.layers = tuple(eqx.tree_at(lambda lin: (lin.weight, lin.bias), lin, wb)
                            for lin, wb in zip(abstract, arrays, strict=True))
        self.in_size, self.out_size, self.width_size, self.depth = (
            in_size, out_size, width_size, depth)
        self.activation, self.final_activation = activation, final_activation
        self.dropout = eqx.nn.Dropout(float(dropout))

    def __call__(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        """Apply the MLP to the last axis of `x` (any leading batch axes). `key` drives the
        dropout (needed in training mode when `dropout > 0`)."""
        if x.shape[-1:] != (self.in_size,):
            raise ValueError(f"MLP expects inputs (..., {self.in_size}), got shape {x.shape}.")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.layers[0].weight.dtype)
        act = ACTIVATIONS[self.activation]
        keys = [None] * len(self.layers) if key is None else jax.random.split(key, len(self.layers))
        for i, layer in enumerate(self.layers):
            x = x @ layer.weight.T.astype(x.dtype) + layer.bias.astype(x.dtype)
            if i < len(self.layers) - 1:
                x = self.dropout(act(x), key=keys[i])
        if self.final_activation is not None:
            x = ACTIVATIONS[self.final_activation](x)
        return x

    def arch(self) -> dict[str, Any]:
        """JSON-able constructor keyword arguments (`build_model` rebuilds the model from them)."""
        return {"in_size": self.in_size, "out_size": self.out_size,
                "width_size": self.width_size, "depth": self.depth,
                "activation": self.activation, "final_activation": self.final_activation,
                "dropout": self.dropout.p}
