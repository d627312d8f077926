"""`EnsembleStep`: the train step of an ensemble, `jax.vmap` of `TrainStep`'s step over the
members (see `distributed.core.ensemble` for the state's layout)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .ensemble import ENSEMBLE, member_axes, member_key
from .step import TrainStep


class EnsembleStep(TrainStep):
    """`TrainStep` over an ensemble state: every member takes its own step on the same batch,
    in one compiled program (`jax.vmap` over the member axis; with ``impl="shard_map"`` the
    member axis is the mesh's ``ensemble`` axis inside the map).

    Same arguments and call as `TrainStep` (``state_shardings`` from
    `distributed.core.ensemble.init_members`). Each member skips its own non-finite updates.
    The metrics are scalars over the members:

    - ``loss`` and every other metric: the mean over the members whose update was finite;
    - ``finite``: 1 when at least one member's update was finite;
    - ``nonfinite_count``: steps so far on which no member's update was finite (the shared
      ``state.nonfinite_count``);
    - ``loss_member<i>``: member ``i``'s loss (NaN or inf when its update was skipped);
    - ``finite_member<i>``: 1 when member ``i``'s update was finite (epoch means of member
      ``i``'s metrics leave out the steps it skipped).
    """

    def _step(self, arrays, static, batch, active):
        spmd = ENSEMBLE if ENSEMBLE in self.mesh.axis_names else None
        one = lambda a: TrainStep._step(self, a, static, batch, active)  # noqa: E731
        new, per = jax.vmap(one, in_axes=(member_axes(),),
                            out_axes=(dataclasses.replace(member_axes(), nonfinite_count=0), 0),
                            spmd_axis_name=spmd)(arrays)
        finite = per["finite"] > 0
        count = arrays.nonfinite_count + (~jnp.any(finite)).astype(jnp.int32)
        new = dataclasses.replace(new, nonfinite_count=count)
        n_ok = jnp.maximum(jnp.sum(finite), 1).astype(jnp.float32)
        metrics = {}
        for k, v in per.items():
            if k == "finite":
                metrics[k] = jnp.max(v)
            elif k == "nonfinite_count":
                metrics[k] = count
            else:
                metrics[k] = jnp.sum(jnp.where(finite, v, 0.0)) / n_ok
        for i in range(finite.shape[0]):
            metrics[member_key("loss", i)] = per["loss"][i]
            metrics[member_key("finite", i)] = per["finite"][i]
        return new, metrics
