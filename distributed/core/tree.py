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


def _storage(x: jax.Array) -> Any:
    """What identifies ``x``'s memory: its device buffers (two Python arrays may share them,
    e.g. after putting one array on a device twice), or the object itself."""
    try:
        return tuple(s.data.unsafe_buffer_pointer() for s in x.addressable_shards)
    except Exception:  # noqa: BLE001 - deleted, or a backend without pointers
        return id(x)


def aliased_leaves(tree: Any) -> list[list[str]]:
    """Groups of key paths whose array leaves share memory (e.g. tied weights written as one
    array in two fields). Empty when every array leaf has its own."""
    seen: dict[Any, list[str]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array):
            seen.setdefault(_storage(leaf), []).append(jax.tree_util.keystr(path))
    return [paths for paths in seen.values() if len(paths) > 1]


def dealias(tree: Any) -> Any:
    """``tree`` with every array leaf that shares memory with an earlier one replaced by a copy.

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
    seen: set[Any] = set()

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        key = _storage(x)
        if key in seen:
            return jnp.array(x, copy=True)
        seen.add(key)
        return x

    return jax.tree.map(one, tree)
