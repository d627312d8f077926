"""Block coordinate descent: blocks of parameters, filter specs, cycles and phase plans.

A *block* is a named filter spec: a ``PyTree[bool]`` mirroring the model, ``True`` on the arrays
the block owns. A model takes part in BCD by naming its blocks with class attributes
``param_fields`` and ``nonparam_fields`` (tuples of attribute names); any other split works by
passing explicit filter specs. A *phase* trains a set of blocks for a number of epochs; a
*cycle* is a sequence of phases (the five cycles of WaveDiff). Nothing here jits or touches a
mesh: these are plain functions of the model's structure and of the step counter.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .clock import EpochClock

PARAM = "param"
NONPARAM = "nonparam"

CYCLES: dict[str, tuple[tuple[str, ...], ...]] = {
    "parametric": ((PARAM,), (NONPARAM,)),
    "non-parametric": ((NONPARAM,), (PARAM,)),
    "complete": ((PARAM,), (NONPARAM,), (PARAM, NONPARAM)),
    "only-parametric": ((PARAM,),),
    "only-non-parametric": ((NONPARAM,),),
}

_PHASE_NAMES = {
    (PARAM,): "parametric",
    (NONPARAM,): "non-parametric",
    (PARAM, NONPARAM): "complete",
}


def is_param(x: Any) -> bool:
    """A floating array, concrete or abstract (`jax.ShapeDtypeStruct`)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jnp.issubdtype(x.dtype, jnp.inexact)
    return eqx.is_inexact_array(x)


def field_filter(model: Any, fields: Sequence[str]) -> Any:
    """``True`` on the inexact arrays under the attributes ``fields`` of ``model``."""
    missing = [f for f in fields if not hasattr(model, f)]
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no field(s) {missing}; check its `param_fields` / "
            f"`nonparam_fields` or pass an explicit filter spec."
        )
    spec = jax.tree.map(lambda _: False, model)
    for f in fields:
        sub = jax.tree.map(is_param, getattr(model, f))
        spec = eqx.tree_at(lambda m, f=f: getattr(m, f), spec, sub, is_leaf=lambda x: x is None)
    return spec


def _named_fields(model: Any, attr: str) -> tuple[str, ...]:
    fields = getattr(type(model), attr, None)
    if fields is None:
        raise ValueError(
            f"{type(model).__name__} does not name its BCD blocks: give it class attributes "
            f"`param_fields` and `nonparam_fields` (tuples of attribute names), or pass explicit "
            f"filter specs."
        )
    return tuple(fields)


def param_filter(model: Any) -> Any:
    """Filter spec of the parametric block (the fields in ``model.param_fields``)."""
    return field_filter(model, _named_fields(model, "param_fields"))


def nonparam_filter(model: Any) -> Any:
    """Filter spec of the non-parametric block (the fields in ``model.nonparam_fields``)."""
    return field_filter(model, _named_fields(model, "nonparam_fields"))


def complete_filter(model: Any) -> Any:
    """All trainable parameters: both named blocks, or every inexact array if none are named."""
    if hasattr(type(model), "param_fields") and hasattr(type(model), "nonparam_fields"):
        return union(param_filter(model), nonparam_filter(model))
    return jax.tree.map(is_param, model)


def union(*specs: Any) -> Any:
    """The filter spec selecting what any of ``specs`` selects."""
    return jax.tree.map(lambda *xs: any(bool(x) for x in xs), *specs)


def model_blocks(model: Any) -> dict[str, Any]:
    """``{"param": ..., "nonparam": ...}`` for a model that names its blocks."""
    return {PARAM: param_filter(model), NONPARAM: nonparam_filter(model)}


def check_blocks(model: Any, blocks: Mapping[str, Any]) -> None:
    """Blocks must be non-empty filter specs of ``model`` and must not overlap.

    Raises:
        ValueError: naming the empty block or the leaf owned by two blocks.
    """
    owner: dict[str, str] = {}
    for name, spec in blocks.items():
        chosen = eqx.filter(model, spec)
        flat = jax.tree_util.tree_leaves_with_path(
            jax.tree.map(lambda x: x is not None and is_param(x), chosen)
        )
        picked = [jax.tree_util.keystr(p) for p, v in flat if v]
        if not picked:
            raise ValueError(f"BCD block {name!r} selects no arrays of the model.")
        for p in picked:
            if p in owner:
                raise ValueError(
                    f"parameter {p} belongs to both BCD blocks {owner[p]!r} and {name!r}; "
                    f"blocks must be disjoint."
                )
            owner[p] = name


@dataclasses.dataclass(frozen=True)
class Phase:
    """One BCD phase: train ``blocks`` for ``epochs`` epochs.

    ``zero_alpha_on_enter`` / ``identity_alpha_on_exit`` implement WaveDiff's first-run rule.
    """

    name: str
    blocks: tuple[str, ...]
    epochs: int
    zero_alpha_on_enter: bool = False
    identity_alpha_on_exit: bool = False


def make_phase_plan(
    cycle: str,
    *,
    epochs_param: int,
    epochs_nonparam: int,
    epochs_complete: int = 0,
    first_run: bool = False,
) -> tuple[Phase, ...]:
    """The phases of ``cycle`` (one of `CYCLES`), with epochs per phase kind.

    With ``first_run``, a parametric phase that opens the cycle starts with the non-parametric
    mixing zeroed (``set_alpha_zero``) and restores it (``set_alpha_identity``) when it ends.
    Phases with zero epochs are dropped.

    Raises:
        ValueError: an unknown cycle (listing the valid ones) or negative epochs.
    """
    if cycle not in CYCLES:
        raise ValueError(f"unknown BCD cycle {cycle!r}; valid cycles: {list(CYCLES)}.")
    epochs = {(PARAM,): epochs_param, (NONPARAM,): epochs_nonparam}
    epochs[(PARAM, NONPARAM)] = epochs_complete
    for blocks, n in epochs.items():
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise ValueError(
                f"epochs for the {_PHASE_NAMES[blocks]} phase must be an integer >= 0, got {n!r}."
            )
        epochs[blocks] = int(n)
    plan = []
    for i, blocks in enumerate(CYCLES[cycle]):
        first_param = first_run and i == 0 and blocks == (PARAM,)
        plan.append(
            Phase(
                name=_PHASE_NAMES[blocks],
                blocks=blocks,
                epochs=epochs[blocks],
                zero_alpha_on_enter=first_param,
                identity_alpha_on_exit=first_param,
            )
        )
    plan = tuple(p for p in plan if p.epochs > 0)
    if not plan:
        raise ValueError(f"BCD cycle {cycle!r} has no phase with a positive number of epochs.")
    return plan


def single_phase_plan(epochs: int, blocks: tuple[str, ...] = ("all",)) -> tuple[Phase, ...]:
    """A plan with one phase training ``blocks`` (plain, non-BCD training)."""
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1.")
    return (Phase(name="train", blocks=blocks, epochs=epochs),)


def _clock(steps_per_epoch: int | EpochClock) -> EpochClock:
    if isinstance(steps_per_epoch, EpochClock):
        return steps_per_epoch
    return EpochClock(int(steps_per_epoch), 1)


def phase_boundaries(plan: Sequence[Phase], steps_per_epoch: int | EpochClock) -> list[int]:
    """Global step at which each phase starts, plus the total step count at the end.

    ``steps_per_epoch`` is an int, or an `EpochClock` (epochs of a number of examples that the
    batch size need not divide: phase ``p`` starts at ``clock.steps(epochs before p)``).
    """
    clock, bounds, epochs = _clock(steps_per_epoch), [0], 0
    for p in plan:
        epochs += p.epochs
        bounds.append(clock.steps(epochs))
    return bounds


def phase_at(plan: Sequence[Phase], step: int, steps_per_epoch: int | EpochClock) -> int:
    """Index of the phase that batch index ``step`` (0-based) belongs to (the last one past the
    end)."""
    bounds = phase_boundaries(plan, steps_per_epoch)
    for i in range(len(plan)):
        if step < bounds[i + 1]:
            return i
    return len(plan) - 1


def block_updates(plan: Sequence[Phase], steps_per_epoch: int | EpochClock) -> dict[str, int]:
    """Updates each block receives over the whole plan (the steps of the phases training it);
    the length of a block's learning-rate schedule, which counts that block's own updates."""
    bounds = phase_boundaries(plan, steps_per_epoch)
    out: dict[str, int] = {}
    for i, p in enumerate(plan):
        for b in p.blocks:
            out[b] = out.get(b, 0) + bounds[i + 1] - bounds[i]
    return out


def enter_phase(model: Any, plan: Sequence[Phase], previous: int, current: int) -> Any:
    """Apply the first-run rule when moving from phase ``previous`` (-1: none) to ``current``."""
    if previous == current:
        return model
    if previous >= 0 and plan[previous].identity_alpha_on_exit:
        model = _call(model, "set_alpha_identity")
    if plan[current].zero_alpha_on_enter:
        model = _call(model, "set_alpha_zero")
    return model


def _call(model: Any, method: str) -> Any:
    fn = getattr(model, method, None)
    if fn is None:
        raise ValueError(
            f"first_run=True needs {type(model).__name__}.{method}(); add that method (returning "
            f"a new model) or set first_run=False."
        )
    return fn()
