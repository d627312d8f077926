"""Small pytree helpers used across the package: copies, selection, aliasing checks."""

from __future__ import annotations

import logging
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


def tree_copy(tree: Any) -> Any:
    """A copy of every array leaf of ``tree`` (same shardings; other leaves shared).

    Needed wherever a state is kept while the train step donates its buffers (best-state
    snapshots, recovery snapshots, a caller's model that must stay valid).
    """
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the scalar ``pred`` holds, else ``old`` (array leaves; others from ``new``)."""
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o) if eqx.is_array(n) else n, new, old)


def aliased_leaves(tree: Any) -> list[list[str]]:
    """Groups of key paths whose leaves are the *same* array object (e.g. tied weights written
    as one array in two fields). Empty when every array leaf is distinct."""
    seen: dict[int, list[str]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array):
            seen.setdefault(id(leaf), []).append(jax.tree_util.keystr(path))
    return [paths for paths in seen.values() if len(paths) > 1]


def dealias(tree: Any) -> Any:
    """``tree`` with every repeated array leaf replaced by a copy (the first use is kept).

    JAX treats each pytree leaf as its own value, so a model holding one array in two fields
    trains them as two parameters either way; but a step that *donates* its input would be
    handed the same buffer twice, which XLA cannot do. Logs a warning naming the fields.
    """
    groups = aliased_leaves(tree)
    if not groups:
        return tree
    for paths in groups:
        log.warning("the fields %s hold the same array; they are trained as separate "
                    "parameters (to tie weights, use eqx.nn.Shared)", ", ".join(paths))
    seen: set[int] = set()

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    return jax.tree.map(one, tree)
