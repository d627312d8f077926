"""What a checkpoint step holds besides Orbax's own files: the state pytree as the flat dict
Orbax saves (array leaves keyed by `jax.tree_util.keystr` paths, typed PRNG keys as key data),
its JSON-able scalar leaves, and the data iterator's position."""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import CheckpointMismatch
from .leaves import is_key, jsonable, key_impl

_SCALARS = (bool, int, float, str)

def is_array_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def name_of(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _replicated() -> NamedSharding:
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def _host_local(sharding) -> bool:
    """A sharding on this process's devices only, in a multi-process run."""
    return jax.process_count() > 1 and sharding.is_fully_addressable


def to_flat(state: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """`{keystr(path): array}` (typed keys as key data), and `{path: PRNG impl}` of the keys.

    In multi-process runs a host-local array (e.g. a scalar made outside jit) is taken to hold
    the same value on every process, and becomes a replicated global array Orbax can save.
    """
    flat, impls = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(f"Cannot save the abstract leaf {name_of(path)}: {leaf}.")
        if not is_array_leaf(leaf):
            continue
        if is_key(leaf):
            impls[name_of(path)] = key_impl(leaf)
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and _host_local(leaf.sharding):
            leaf = jax.make_array_from_process_local_data(_replicated(), np.asarray(leaf))
        flat[name_of(path)] = leaf
    return flat, impls


def target_leaf(leaf: Any) -> Any:
    """The Orbax restore target of a template leaf: its shape, dtype and sharding.

    Leaves without a sharding (e.g. from `eqx.filter_eval_shape`), and host-local ones in
    multi-process runs, are restored replicated on every device.
    """
    if isinstance(leaf, np.ndarray):
        return leaf  # restored as a host numpy array
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or _host_local(sharding):
        sharding = _replicated()
    shape = jax.eval_shape(jax.random.key_data, leaf) if is_key(leaf) else leaf
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def from_flat(template: Any, flat: dict[str, Any], impls: dict[str, str], where: str) -> Any:
    """`template` with its array leaves taken from `flat` (typed keys re-wrapped)."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in paths_leaves:
        name = name_of(path)
        if not is_array_leaf(leaf):
            leaves.append(leaf)
        elif is_key(leaf):
            impl = key_impl(leaf)
            if impls.get(name, impl) != impl:
                raise CheckpointMismatch(f"{where}: {name} is a {impls[name]!r} key, not {impl!r}.")
            leaves.append(jax.random.wrap_key_data(flat[name], impl=impl))
        else:
            leaves.append(flat[name])
    return jax.tree_util.tree_unflatten(treedef, leaves)


def check_matches(where: str, saved: dict, target: dict) -> None:
    """Raise naming every difference between the saved arrays and the template's."""
    problems = [f"{n}: in the checkpoint, not in the template" for n in saved.keys() - target]
    problems += [f"{n}: in the template, not in the checkpoint" for n in target.keys() - saved]
    for name in saved.keys() & target.keys():
        got, want = saved[name], target[name]
        if tuple(got.shape) != tuple(want.shape) or np.dtype(got.dtype) != np.dtype(want.dtype):
            problems.append(
                f"{name}: checkpoint has shape {tuple(got.shape)} {np.dtype(got.dtype)}, "
                f"template has shape {tuple(want.shape)} {np.dtype(want.dtype)}"
            )
    if problems:
        raise CheckpointMismatch(
            f"{where} does not match the template state ({len(problems)} differences):\n  "
            + "\n  ".join(sorted(problems)[:20])
        )




def scalar_leaves(state: Any) -> dict[str, Any]:
    """``{keystr(path): value}`` of the Python bool/int/float/str leaves (saved as JSON)."""
    return {name_of(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
            if isinstance(leaf, _SCALARS) and not isinstance(leaf, np.generic)}


def with_scalars(tree: Any, scalars: dict[str, Any], where: str) -> Any:
    """``tree`` with its Python scalar leaves replaced by the saved ``scalars``.

    Raises:
        CheckpointMismatch: a saved scalar's type differs from the template's (e.g. a string
            where the template has a number), naming the leaf.
    """
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = []
    for path, leaf in paths_leaves:
        name = name_of(path)
        if name in scalars and isinstance(leaf, _SCALARS):
            saved = scalars[name]
            if type(saved) is not type(leaf) and not (
                    isinstance(leaf, float) and isinstance(saved, int)):
                raise CheckpointMismatch(f"{where}: {name} was saved as {saved!r}, the template "
                                         f"has {leaf!r} of another type.")
            leaf = type(leaf)(saved)
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def data_record(state: Any) -> Any:
    """The data position to save: the one state all processes share (as the pipelines of
    `distributed.data` do), or ``{"per_process": [...]}`` when they differ. Collective."""
    state = jsonable(state)
    if jax.process_count() == 1:
        return state
    text = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([text.size]))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:text.size] = text
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    states = [json.loads(bytes(r[:int(n)]).decode()) for r, n in zip(rows, np.ravel(sizes),
                                                                     strict=True)]
    return states[0] if all(s == states[0] for s in states) else {"per_process": states}


def data_state(record: Any, where: str) -> Any:
    """This process's position from a saved data record."""
    if not (isinstance(record, dict) and set(record) == {"per_process"}):
        return record
    states = record["per_process"]
    if len(states) != jax.process_count():
        raise CheckpointMismatch(
            f"{where}: its data positions were saved by {len(states)} processes and differ "
            f"between them, so they cannot be shared out to {jax.process_count()}; restore "
            f"with data_iterator=None.")
    return states[jax.process_index()]
