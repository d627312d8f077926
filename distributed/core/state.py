"""`TrainState`: everything a step reads and writes, as one pytree, and its sharded init."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from .sharding import shard, sharded_init, tree_shardings


class TrainState(eqx.Module):
    """The training state: a pytree, so it jits, shards and checkpoints as one object.

    Attributes:
        step: global step (batches consumed), int32 scalar.
        model: the Equinox model.
        opt_state: ``{block name: optax state}``; each block's state covers only its arrays,
            and is left untouched (bit for bit) while its block is inactive.
        key: PRNG key for stochastic steps (dropout, noise), split each step.
        phase: index of the BCD phase whose entry rule has been applied (-1 before the first).
        lr_scale: multiplier on every update, lowered by loss-explosion recovery.
        nonfinite_count: number of steps whose update was skipped for a non-finite loss/grad.
    """

    step: jax.Array
    model: Any
    opt_state: dict[str, Any]
    key: jax.Array
    phase: jax.Array
    lr_scale: jax.Array
    nonfinite_count: jax.Array


def init_opt_states(
    model: Any, optimizers: Mapping[str, optax.GradientTransformation], blocks: Mapping[str, Any]
) -> dict[str, Any]:
    """Per-block optimizer states, each initialised on ``eqx.filter(model, blocks[name])``."""
    missing = sorted(set(optimizers) ^ set(blocks))
    if missing:
        raise ValueError(
            f"optimizers {sorted(optimizers)} and blocks {sorted(blocks)} must name the same "
            f"blocks; mismatched: {missing}."
        )
    return {b: optimizers[b].init(eqx.filter(model, blocks[b])) for b in blocks}


def create_state(
    model: Any,
    optimizers: Mapping[str, optax.GradientTransformation],
    blocks: Mapping[str, Any],
    *,
    key: jax.Array,
) -> TrainState:
    """A fresh `TrainState` (unsharded: arrays live wherever ``model``'s arrays live)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        model=model,
        opt_state=init_opt_states(model, optimizers, blocks),
        key=key,
        phase=jnp.full((), -1, jnp.int32),
        lr_scale=jnp.ones((), jnp.float32),
        nonfinite_count=jnp.zeros((), jnp.int32),
    )


def _is_builder(model: Any) -> bool:
    """A zero-argument function building the model (not a model: Equinox modules are callable
    too)."""
    return callable(model) and not isinstance(model, eqx.Module)


def init_state(
    model: Any,
    optimizers: Mapping[str, optax.GradientTransformation],
    blocks: Any,
    *,
    key: jax.Array,
    mesh: Mesh,
    **spec_kwargs,
) -> tuple[TrainState, Any]:
    """Create the training state directly in its sharded layout: the one way to build it.

    Args:
        model: ``() -> model`` (e.g. ``lambda: MLP(..., key=k)``; traced under jit, so no full
            host copy of the parameters is ever made), or an existing model, whose arrays are
            copied into their shardings (the caller's model stays valid).
        optimizers: ``{block: optax transformation}``.
        blocks: ``{block: filter spec}``, or ``model -> {block: filter spec}`` (filter specs
            depend on the model's structure only, so they are computed on the abstract model).
        key: the state's PRNG key.
        mesh: the device mesh.
        spec_kwargs: forwarded to `distributed.core.sharding.tree_specs` (strategy, rules, ...).

    Returns:
        ``(state, shardings)`` where ``shardings`` mirrors the state (``None`` at non-arrays).
    """
    if _is_builder(model):
        arrays, static, build = (), None, model
    else:
        arrays, static = eqx.partition(model, eqx.is_array)
        build = lambda a: eqx.combine(a, static)  # noqa: E731
        model_sh = tree_shardings(arrays, mesh, **spec_kwargs)
        arrays = (shard(arrays, model_sh),)
    abstract_model = eqx.filter_eval_shape(build, *arrays)
    blocks = blocks(abstract_model) if callable(blocks) else dict(blocks)

    def init(*a):
        return create_state(build(*a), optimizers, blocks, key=key)

    return sharded_init(init, mesh, *arrays, **spec_kwargs)
