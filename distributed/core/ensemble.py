"""Ensembles: K models trained at once, as one state with a leading member axis.

An ensemble's `TrainState` holds every member. Each array of its ``model``, ``opt_state`` and
``key`` has a leading axis of size K (member ``i`` at index ``i``), split over the mesh axis
``ensemble`` (the other dimensions keep their data / fsdp / tensor specs); ``step``, ``phase``,
``lr_scale`` and ``nonfinite_count`` are shared: every member is at the same step and in the
same BCD phase, and recovery rolls the ensemble back as one. `EnsembleStep` is `jax.vmap` of
the single-member step over the members with the batch broadcast (split over data / fsdp
only), so all members see the same batches. Per-member hyperparameters are numbers in the
optimizer state (`distributed.core.optim.make_optimizer(cfg, sweepable=True)`), set per member
by `set_hyperparams`: a sweep is different values along the member axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import bcd
from .mesh import ENSEMBLE
from .optim import SWEEPABLE, SweepState
from .sharding import is_array_like, tree_specs
from .state import TrainState, create_state

MEMBER_SUFFIX = "_member"
"""Member ``i``'s value of a metric ``m`` is reported as ``m_member<i>`` (`member_key`)."""

MEMBER_FIELDS = ("model", "opt_state", "key")
"""`TrainState` fields with a leading member axis; the others are shared by the members."""


def member_key(name: str, i: int) -> str:
    """The metric name of member ``i``'s ``name``, e.g. ``loss_member2``."""
    return f"{name}{MEMBER_SUFFIX}{i}"


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """Which members to train (`distributed.engine.build(..., ensemble=...)`).

    Attributes:
        init_seeds: member ``i`` is initialised from ``jax.random.key(init_seeds[i])``: its
            model (the task's ``key -> model``) and its state key. ``K = len(init_seeds)``.
        hyperparams: ``{block: {name: K values}}``: member ``i``'s value of a sweepable setting
            (`distributed.core.optim.SWEEPABLE`: ``learning_rate`` (the peak rate) and
            ``weight_decay``) of that block's optimizer; unset ones keep the optimizer's own.

    Raises:
        ValueError: no member, a seed that is not an int, a setting that is not sweepable, or
            a number of values other than K.
    """

    init_seeds: tuple[int, ...]
    hyperparams: Mapping[str, Mapping[str, tuple[float, ...]]] = dataclasses.field(
        default_factory=dict)

    def __post_init__(self):
        seeds = tuple(self.init_seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                            or s < 0 for s in seeds):
            raise ValueError(f"Ensemble.init_seeds={self.init_seeds!r} must be one or more "
                             f"non-negative ints (one per member).")
        object.__setattr__(self, "init_seeds", tuple(int(s) for s in seeds))
        hp = {}
        for block, values in dict(self.hyperparams).items():
            hp[block] = {}
            for name, vals in dict(values).items():
                vals = tuple(float(v) for v in vals)
                if name not in SWEEPABLE:
                    raise ValueError(f"Ensemble.hyperparams[{block!r}]: {name!r} is not a "
                                     f"sweepable setting; use one of {list(SWEEPABLE)}.")
                if len(vals) != len(seeds):
                    raise ValueError(f"Ensemble.hyperparams[{block!r}][{name!r}] has "
                                     f"{len(vals)} values for {len(seeds)} members; give one "
                                     f"per member.")
                if not all(math.isfinite(v) and v >= 0 for v in vals):
                    raise ValueError(f"Ensemble.hyperparams[{block!r}][{name!r}]={vals} must be "
                                     f"finite numbers >= 0.")
                hp[block][name] = vals
        object.__setattr__(self, "hyperparams", hp)

    @property
    def size(self) -> int:
        """K, the number of members."""
        return len(self.init_seeds)


def check_ensemble_mesh(size: int, mesh: Mesh) -> None:
    """K members must split evenly over the mesh's ``ensemble`` axis (size 1 if absent).

    Raises:
        ValueError: naming K, the axis size and two ways out.
    """
    axis = mesh.shape.get(ENSEMBLE, 1)
    if size % axis:
        fits = [d for d in range(1, size + 1) if size % d == 0]
        raise ValueError(f"{size} ensemble member(s) do not split evenly over the mesh's "
                         f"ensemble axis of size {axis}; use a multiple of {axis} members (e.g. "
                         f"{axis * max(1, round(size / axis))}), or a mesh whose ensemble axis "
                         f"divides {size} (one of {fits}).")


def member_axes(shared: int | None = None) -> TrainState:
    """The `jax.vmap` axes of an ensemble state: 0 for `MEMBER_FIELDS`, ``shared`` (default
    None: not mapped) for the rest."""
    return TrainState(step=shared, model=0, opt_state=0, key=0, phase=shared, lr_scale=shared,
                      nonfinite_count=shared)


def member_keys(init_seeds: tuple[int, ...]) -> jax.Array:
    """``(K,)`` typed PRNG keys, member ``i``'s being ``jax.random.key(init_seeds[i])``."""
    data = np.stack([np.asarray(jax.random.key_data(jax.random.key(s))) for s in init_seeds])
    return jax.random.wrap_key_data(jnp.asarray(data))


def member(tree: Any, i: int) -> Any:
    """Member ``i`` of a member-stacked pytree (e.g. an ensemble state's ``model``)."""
    return jax.tree.map(lambda x: x[i] if eqx.is_array(x) else x, tree)


def ensemble_shardings(single: TrainState, mesh: Mesh, **spec_kwargs) -> TrainState:
    """The shardings of an ensemble state, from one member's (abstract) state: member fields
    get ``P("ensemble", *its spec)`` (``None`` first when the mesh has no ensemble axis),
    shared fields their own spec."""
    specs = tree_specs(single, mesh, **spec_kwargs)
    lead = ENSEMBLE if ENSEMBLE in mesh.axis_names else None
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    stacked = {f: jax.tree.map(lambda s: P(lead, *s), getattr(specs, f), is_leaf=is_spec)
               for f in MEMBER_FIELDS}
    specs = dataclasses.replace(specs, **stacked)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def init_members(
    model: Callable[[jax.Array], Any],
    optimizers: Mapping[str, optax.GradientTransformation],
    blocks: Any,
    ensemble: Ensemble,
    *,
    mesh: Mesh,
    **spec_kwargs,
) -> tuple[TrainState, TrainState]:
    """The ensemble's state, created directly in its sharded layout (no host copy).

    Args:
        model: ``key -> model``; member ``i`` is ``model(jax.random.key(init_seeds[i]))``
            (traced under `jax.vmap` and `jax.jit`).
        optimizers: ``{block: optax transformation}``; a block named in
            ``ensemble.hyperparams`` needs a sweepable one (`make_optimizer(sweepable=True)`).
        blocks: ``{block: filter spec}``, or ``model -> {block: filter spec}``.
        ensemble: the members.
        mesh: the device mesh.
        spec_kwargs: forwarded to `distributed.core.sharding.tree_specs`.

    Returns:
        ``(state, shardings)``; every array of the state's `MEMBER_FIELDS` has shape
        ``(K, ...)``.

    Raises:
        ValueError: ``model`` is not a function of a key, K does not split over the mesh, or
            a swept setting the block's optimizer does not keep (see `set_hyperparams`).
    """
    if isinstance(model, eqx.Module) or not callable(model):
        raise ValueError("an ensemble needs the model as a function key -> model (member i is "
                         "built from jax.random.key(init_seeds[i])), not a built model.")
    check_ensemble_mesh(ensemble.size, mesh)
    keys = member_keys(ensemble.init_seeds)
    abstract_model = eqx.filter_eval_shape(model, keys[0])
    blocks = blocks(abstract_model) if callable(blocks) else dict(blocks)

    def one(key):
        return create_state(model(key), optimizers, blocks, key=key)

    single = eqx.filter_eval_shape(one, keys[0])
    shardings = ensemble_shardings(single, mesh, **spec_kwargs)
    arrays_sh = eqx.filter(shardings, lambda x: isinstance(x, NamedSharding))
    static = eqx.filter(single, lambda x: not is_array_like(x))
    init = jax.vmap(lambda k: eqx.filter(one(k), eqx.is_array), out_axes=member_axes())
    arrays = jax.jit(init, out_shardings=arrays_sh)(keys)
    state = eqx.combine(arrays, static)
    opt = dict(state.opt_state)
    for block, values in ensemble.hyperparams.items():
        if block not in opt:
            raise ValueError(f"Ensemble.hyperparams names block {block!r}; the optimizers' "
                             f"blocks are {sorted(opt)}.")
        opt[block] = set_hyperparams(opt[block], values, where=f"block {block!r}")
    return dataclasses.replace(state, opt_state=opt), shardings


def set_hyperparams(opt_state: Any, values: Mapping[str, Any], *, where: str = "the optimizer"
                    ) -> Any:
    """``opt_state`` with each `SweepState`'s ``sweep[name]`` set to ``values[name]``: one
    number per member (float32, laid out like the value it replaces).

    Raises:
        ValueError: no `SweepState` in ``opt_state`` (build the optimizer with
            ``make_optimizer(cfg, sweepable=True)``), or a name it does not keep.
    """
    found: set[str] = set()
    is_sweep = lambda x: isinstance(x, SweepState)  # noqa: E731

    def one(x):
        if not is_sweep(x):
            return x
        sweep = dict(x.sweep)
        for name, vals in values.items():
            if name in sweep:
                old = sweep[name]
                sweep[name] = jax.device_put(np.asarray(vals, np.float32).reshape(old.shape),
                                             old.sharding)
                found.add(name)
        return x._replace(sweep=sweep)

    out = jax.tree.map(one, opt_state, is_leaf=is_sweep)
    missing = sorted(set(values) - found)
    if missing:
        raise ValueError(f"{where}: its optimizer keeps no sweepable {missing} in its state; "
                         f"build it with make_optimizer(cfg, sweepable=True) to give each member "
                         f"its own {', '.join(SWEEPABLE)}.")
    return out


def enter_phase(model: Any, plan, previous: int, current: int) -> Any:
    """`distributed.core.bcd.enter_phase` applied to every member (``model`` itself when no
    first-run rule applies)."""
    probe = member(model, 0)
    if bcd.enter_phase(probe, plan, previous, current) is probe:
        return model
    return eqx.filter_vmap(lambda m: bcd.enter_phase(m, plan, previous, current))(model)
