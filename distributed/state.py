"""`TrainState`: everything a step reads and writes, as one pytree, and its sharded init."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from .sharding import sharded_init


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


def init_state(
    model_fn,
    optimizers: Mapping[str, optax.GradientTransformation],
    blocks_fn,
    *,
    key: jax.Array,
    mesh: Mesh,
    **spec_kwargs,
) -> tuple[TrainState, Any]:
    """Create the state directly in its sharded layout (no full host copy).

    Args:
        model_fn: ``() -> model`` (e.g. ``lambda: MLP(..., key=k)``); traced under jit.
        optimizers: ``{block: optax transformation}``.
        blocks_fn: ``model -> {block: filter spec}`` (filter specs depend on the model's
            structure only, so they are computed on the abstract model).
        key: the state's PRNG key.
        mesh: the device mesh.
        spec_kwargs: forwarded to `distributed.sharding.tree_specs` (strategy, rules, ...).

    Returns:
        ``(state, shardings)`` where ``shardings`` mirrors the state (``None`` at non-arrays).
    """
    abstract_model = eqx.filter_eval_shape(model_fn)
    blocks = blocks_fn(abstract_model)

    def init():
        return create_state(model_fn(), optimizers, blocks, key=key)

    return sharded_init(init, mesh, **spec_kwargs)
