"""`MultiStep`: many train steps in one dispatch.

A step of a small model is microseconds of arithmetic behind a Python dispatch (and, with host
input, a batch copy). `MultiStep` runs up to ``max_steps`` steps of a `TrainStep` in one jitted
call: a `lax.fori_loop` (the trip count is an argument, so one compilation serves every chunk
length) whose body draws its batch on the device (``batch_fn``, e.g.
`distributed.data.resident.DeviceData.batch`) and runs the very step function the step-by-step
path runs. Each step's metrics go into a ``(max_steps, ...)`` buffer, read by the host later.

The steps are the same computation as calling the `TrainStep` once per batch (per-step keys
come from ``state.key`` and ``state.step`` in both); results agree to float rounding (XLA may
fuse the loop body differently).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .state import TrainState
from .step import TrainStep


class MultiStep:
    """``(state, active, n, args) -> (state, metrics)``: ``n <= max_steps`` steps in one call.

    Args:
        train_step: the compiled step (its jit per active blocks is traced into the loop).
        batch_fn: ``(args, i) -> batch``: the ``i``-th batch of the chunk (``i`` traced).
        max_steps: the most steps per call; the metrics buffers have this leading size.

    Calling it returns the state after ``n`` steps and ``{metric: (max_steps, ...) array}``
    whose first ``n`` rows are the steps' metrics (the rest zeros).
    """

    def __init__(self, train_step: TrainStep, batch_fn: Callable[[Any, Any], Any],
                 max_steps: int):
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1.")
        self.train_step, self.batch_fn, self.max_steps = train_step, batch_fn, int(max_steps)
        self._fast: dict[Any, tuple] = {}

    def __call__(self, state: TrainState, active: Sequence[str], n: int, args: Any
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
        if not 1 <= n <= self.max_steps:
            raise ValueError(f"n={n} steps: need 1 <= n <= max_steps={self.max_steps}.")
        # Fast path (as `TrainStep`'s): one flatten, identity checks on the static leaves.
        leaves, treedef = jax.tree.flatten(state)
        entry = self._fast.get((tuple(active), treedef))
        if entry is None or not all(leaves[i] is v for i, v in entry[2]):
            step_fn, _ = self.train_step.compiled(state, active)
            arrays = eqx.filter(state, eqx.is_array)
            idx = [i for i, x in enumerate(leaves) if eqx.is_array(x)]
            statics = [(i, x) for i, x in enumerate(leaves) if not eqx.is_array(x)]
            entry = (self._compile(step_fn, arrays, args), idx, statics,
                     jax.tree.structure(arrays))
            self._fast[(tuple(active), treedef)] = entry
        fn, idx, _, arrays_def = entry
        new_arrays, metrics = fn(arrays_def.unflatten([leaves[i] for i in idx]),
                                 jnp.asarray(n, jnp.int32), args)
        for i, a in zip(idx, jax.tree.leaves(new_arrays), strict=True):
            leaves[i] = a
        return treedef.unflatten(leaves), metrics

    def _compile(self, step_fn: Callable, arrays: Any, args: Any) -> Callable:
        k = self.max_steps
        shapes = jax.eval_shape(lambda a, x: step_fn(a, self.batch_fn(x, 0))[1], arrays, args)

        def run(arrays, n, args):
            def body(i, carry):
                a, buf = carry
                a, m = step_fn(a, self.batch_fn(args, i))
                return a, jax.tree.map(lambda b, v: b.at[i].set(v), buf, m)

            buf = jax.tree.map(lambda s: jnp.zeros((k, *s.shape), s.dtype), shapes)
            return jax.lax.fori_loop(0, n, body, (arrays, buf))

        mesh = self.train_step.mesh
        state_sh = jax.tree.map(lambda x: x.sharding, arrays)
        return jax.jit(run, out_shardings=(state_sh, NamedSharding(mesh, P())),
                       donate_argnums=(0,) if self.train_step.options.donate else ())


def for_step(train_step: TrainStep, layout: Any, batch_fn: Callable[[Any, Any], Any],
             max_steps: int) -> MultiStep:
    """The `MultiStep` of ``train_step`` for batches of ``layout`` (hashable: everything static
    about how ``batch_fn`` draws a batch), made once and kept on ``train_step``: engines built
    with the same step (``build(train_step=...)``) share its compilations."""
    key = (layout, int(max_steps))
    multi = train_step.multi_steps.get(key)
    if multi is None:
        multi = train_step.multi_steps[key] = MultiStep(train_step, batch_fn, max_steps)
    return multi
