"""Pytree -> PartitionSpec / NamedSharding trees, and sharded initialisation.

A leaf's spec is decided from its key path and shape, so parameters and the optimizer moments
that mirror them (whose key paths end with the parameter's path) get the same spec:

1. ``tensor`` (when the mesh's tensor axis is > 1 and the strategy allows it): the first rule in
   ``rules`` whose regex matches the leaf's path and whose logical axes have the leaf's rank
   names the dimensions split over ``tensor`` (logical names ``mlp``, ``heads``, ``vocab``).
2. ``fsdp`` (when the mesh's fsdp axis is > 1 and the strategy allows it): the largest remaining
   dimension divisible by the fsdp size is split over ``fsdp``. Arrays smaller than
   ``min_fsdp_size`` elements, and arrays with no divisible dimension, stay replicated.
3. Everything else is replicated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .mesh import BATCH_AXES, FSDP, TENSOR
from .tree import dealias

Strategy = Literal["auto", "replicate", "fsdp", "tensor"]
STRATEGIES = ("auto", "replicate", "fsdp", "tensor")

# Logical dimension names that are split over the tensor axis.
TENSOR_LOGICAL = frozenset({"mlp", "heads", "vocab"})

Rule = tuple[str, tuple[str | None, ...]]


def _mlp_rules(max_layers: int = 64) -> list[Rule]:
    # Megatron-style pairs for `layers[i].weight` of shape (out, in): even layers split their
    # output features (column parallel, bias too), odd layers their input features (row parallel).
    rules: list[Rule] = []
    for i in range(max_layers):
        if i % 2 == 0:
            rules.append((rf"layers\[{i}\]\.weight$", ("mlp", None)))
            rules.append((rf"layers\[{i}\]\.bias$", ("mlp",)))
        else:
            rules.append((rf"layers\[{i}\]\.weight$", (None, "mlp")))
    return rules


# Rules for the models shipped here: the MLP and the transformer LM (stacked layers first).
DEFAULT_TENSOR_RULES: tuple[Rule, ...] = (
    (r"\.w[qkv]$", (None, None, "heads", None)),  # (layers, d_model, heads, head_dim)
    (r"\.wo$", (None, "heads", None, None)),  # (layers, heads, head_dim, d_model)
    (r"\.w_in$", (None, None, "mlp")),  # (layers, d_model, d_ff)
    (r"\.w_out$", (None, "mlp", None)),  # (layers, d_ff, d_model)
    (r"\.(embed|embedding)$", ("vocab", None)),  # (vocab, d_model)
    (r"\.unembed$", (None, "vocab")),  # (d_model, vocab): logits come out split over vocab
    *_mlp_rules(),
)


def is_array_like(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def leaf_spec(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    *,
    strategy: Strategy = "auto",
    rules: Sequence[Rule] = DEFAULT_TENSOR_RULES,
    min_fsdp_size: int = 1024,
) -> P:
    """The `PartitionSpec` of one array leaf at key path ``path`` (see the module docstring)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sharding strategy {strategy!r} is not one of {list(STRATEGIES)}.")
    spec: list[Any] = [None] * len(shape)
    tensor = mesh.shape.get(TENSOR, 1)
    fsdp = mesh.shape.get(FSDP, 1)
    if tensor > 1 and strategy in ("auto", "tensor"):
        for pattern, logical in rules:
            if len(logical) == len(shape) and re.search(pattern, path):
                for d, name in enumerate(logical):
                    if name in TENSOR_LOGICAL and shape[d] % tensor == 0:
                        spec[d] = TENSOR
                        break  # one tensor dimension per array
                break
    if fsdp > 1 and strategy in ("auto", "fsdp") and math.prod(shape) >= min_fsdp_size:
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            d = max(free, key=lambda i: (shape[i], -i))
            spec[d] = FSDP
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_specs(
    tree: Any,
    mesh: Mesh,
    *,
    strategy: Strategy = "auto",
    rules: Sequence[Rule] = DEFAULT_TENSOR_RULES,
    min_fsdp_size: int = 1024,
) -> Any:
    """A pytree of `PartitionSpec` (array leaves) and ``None`` (other leaves) for ``tree``."""

    def one(path, leaf):
        if not is_array_like(leaf):
            return None
        return leaf_spec(
            jax.tree_util.keystr(path),
            leaf.shape,
            mesh,
            strategy=strategy,
            rules=rules,
            min_fsdp_size=min_fsdp_size,
        )

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree: Any, mesh: Mesh, **kwargs) -> Any:
    """Like `tree_specs` but returns `NamedSharding`s."""
    specs = tree_specs(tree, mesh, **kwargs)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> P:
    """The global batch is split on its leading dimension over the mesh's batch axes (those of
    ``batch_axes`` the mesh has); every other dimension is replicated."""
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    return P(axes if axes else None)


def batch_sharding(mesh: Mesh, batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """`NamedSharding` of a global batch: see `batch_spec`."""
    return NamedSharding(mesh, batch_spec(mesh, batch_axes))


def shard(tree: Any, shardings: Any) -> Any:
    """`jax.device_put` every array leaf of ``tree`` onto its sharding (other leaves kept).

    Leaves that share memory (one array in two fields) are copied first, so the result never
    hands a donating step the same buffer twice (see `distributed.core.tree.dealias`).
    """
    arrays, rest = eqx.partition(dealias(tree), is_array_like)
    sh = eqx.filter(shardings, lambda x: isinstance(x, jax.sharding.Sharding))
    arrays = jax.tree.map(
        lambda x, s: jax.device_put(x, s), arrays, sh, is_leaf=lambda x: x is None
    )
    return eqx.combine(arrays, rest)


def abstract(tree: Any, shardings: Any | None = None) -> Any:
    """``tree`` with array leaves replaced by `jax.ShapeDtypeStruct`s (carrying ``shardings``)."""

    def one(x, s=None):
        if not is_array_like(x):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings, is_leaf=lambda x: x is None)


def sharded_init(fn: Callable[..., Any], mesh: Mesh, *args: Any, **spec_kwargs) -> tuple[Any, Any]:
    """Run ``fn(*args)`` (e.g. model + optimizer init) so each device only builds its own shards.

    ``eqx.filter_eval_shape(fn, *args)`` gives the abstract output, `tree_shardings` its
    shardings, and ``jax.jit(fn, out_shardings=...)`` materialises the arrays directly in their
    sharded layout: no full host copy of the parameters is ever made. ``args`` (pytrees of
    arrays) are inputs, not captured constants, and are not donated.

    Returns:
        ``(tree, shardings)``: the initialised pytree and its sharding tree (``None`` at
        non-array leaves).
    """
    shape_tree = eqx.filter_eval_shape(fn, *args)
    shardings = tree_shardings(shape_tree, mesh, **spec_kwargs)
    arrays_sh = eqx.filter(shardings, lambda x: isinstance(x, jax.sharding.Sharding))
    static = eqx.filter(shape_tree, lambda x: not is_array_like(x))
    arrays = jax.jit(lambda *a: eqx.filter(fn(*a), eqx.is_array), out_shardings=arrays_sh)(*args)
    return eqx.combine(arrays, static), shardings


def addressable_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s arrays held by the first local device (to check FSDP savings)."""
    dev = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for s in leaf.addressable_shards:
            if s.device == dev:
                total += s.data.nbytes
    return total
