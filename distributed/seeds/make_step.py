"""WaveDiff's functional step and epoch (seed 000): `make_step` and `train_epoch`."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..core.mesh import batch_shard_count
from ..core.ratio import as_ratio
from ..data import epoch_permutation, to_global


def _seed_step(model, opt_state, optimizer, batch, loss_fn, filter_spec):
    diff, static = eqx.partition(model, filter_spec)

    def loss_of(d):
        return as_ratio(loss_fn(eqx.combine(d, static), batch)).value()

    loss, grads = jax.value_and_grad(loss_of)(diff)
    updates, opt_state = optimizer.update(grads, opt_state, diff)
    return eqx.apply_updates(model, updates), opt_state, loss


_seed_step_jit = eqx.filter_jit(_seed_step)
_seed_step_jit_donate = eqx.filter_jit(_seed_step, donate="all")


def make_step(model, opt_state, optimizer, batch, loss_fn, filter_spec, *, donate: bool = False):
    """One optimizer step on the parameters selected by ``filter_spec`` (seed 000's API).

    Gradients are taken only for the selected arrays; every other leaf of ``model`` is returned
    bit for bit. Arrays keep the shardings they come in with (shard the model and batch over a
    mesh first, e.g. with `distributed.shard`), so this is data/FSDP parallel when the inputs
    are. Compiled once per filter spec (and optimizer, loss and shapes).

    Args:
        model: the Equinox model.
        opt_state: ``optimizer.init(eqx.filter(model, filter_spec))``.
        optimizer: an optax transformation.
        batch: any pytree of arrays, passed to ``loss_fn``.
        loss_fn: ``(model, batch) -> scalar loss`` (or a `distributed.Ratio`).
        filter_spec: ``PyTree[bool]`` mirroring the model (e.g. `param_filter(model)`).
        donate: donate the input buffers (saves memory; the inputs may not be used again).
            Off by default, so the originals stay valid as the seed documents.

    Returns:
        ``(new_model, new_opt_state, loss)``.
    """
    fn = _seed_step_jit_donate if donate else _seed_step_jit
    return fn(model, opt_state, optimizer, batch, loss_fn, filter_spec)


def seed_from_key(key: jax.Array) -> int:
    """A non-negative Python int derived from a PRNG key (typed or raw)."""
    return int(jax.device_get(jax.random.randint(key, (), 0, 2**31 - 1)))


def train_epoch(model, opt_state, optimizer, data, batch_size, loss_fn, filter_spec, key, *,
                mesh: Mesh | None = None, epoch: int = 0):
    """One epoch of `make_step` over shuffled mini-batches (seed 000's ``train_epoch``).

    Every example is trained once per epoch: the examples are shuffled (the order of epoch
    ``epoch`` of `distributed.data.epoch_permutation` for the seed derived from ``key``) and cut
    into batches of ``batch_size``; the last, smaller batch holds the remainder (one more
    compilation for its shape).

    Args:
        model, opt_state, optimizer, loss_fn, filter_spec: as for `make_step`; ``loss_fn(model,
            batch)`` gets each batch as a tuple in the order of ``data``.
        data: a tuple of arrays sharing their leading (example) dimension.
        batch_size: examples per mini-batch (a data set smaller than one batch is used whole).
        key: PRNG key: the shuffle order is a deterministic function of it.
        mesh: optionally, put each batch on this mesh, split over its batch axes (a remainder
            batch that does not split evenly is replicated).
        epoch: the epoch number mixed into the shuffle.

    Returns:
        ``(model, opt_state, epoch_loss)``: the mean of the batch losses weighted by their
        sizes, as a float.
    """
    if not isinstance(data, (tuple, list)) or not data:
        raise ValueError("train_epoch: data must be a non-empty tuple of arrays.")
    arrays = [np.asarray(jax.device_get(a)) for a in data]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"train_epoch: every array needs {n} rows; got "
                         f"{[len(a) for a in arrays]}.")
    b = max(1, min(int(batch_size), n))
    order = epoch_permutation(seed_from_key(key), epoch, n)
    losses, sizes = [], []
    for start in range(0, n, b):
        idx = order[start:start + b]
        batch = tuple(a[idx] for a in arrays)
        if mesh is not None:
            if len(idx) % batch_shard_count(mesh) == 0:
                batch = tuple(to_global({"x": x}, mesh)["x"] for x in batch)
            else:
                batch = jax.device_put(batch, NamedSharding(mesh, P()))
        model, opt_state, loss = make_step(model, opt_state, optimizer, batch, loss_fn,
                                           filter_spec)
        losses.append(loss)
        sizes.append(len(idx))
    return model, opt_state, float(np.average(jax.device_get(losses), weights=sizes))
