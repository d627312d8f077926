"""The system's pure train step over a `TrainState`: partition by the active BCD blocks, take
the gradient of the loss, update each active block with its own optimizer, combine.

`TrainStep` compiles it once per set of active blocks with explicit in/out shardings and
donation ("pjit style"), or as a `shard_map` twin with explicit collectives over the batch axes.
Both give the same numbers, also for normalised losses: a loss may return a `Ratio` (numerator
and denominator per term), and micro-batches and devices are combined by adding numerators and
denominators, never by averaging ratios. Gradient accumulation therefore changes memory only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .bcd import union
from .losses import takes_argument
from .mesh import BATCH_AXES
from .optim import current_learning_rate
from .ratio import Ratio, as_ratio
from .sharding import batch_spec
from .state import TrainState
from .tree import aliased_leaves, dealias, tree_where

log = logging.getLogger(__name__)

LossFn = Callable[..., Any]
STEP_IMPLS = ("jit", "shard_map")
STEP_METRICS = ("full", "minimal")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Options of `TrainStep`.

    Attributes:
        grad_accum: micro-batches per step (``lax.scan``); the batch must split evenly. The
            result equals one full batch for every `Ratio` loss (and for scalar losses that are
            means over examples); a loss with ``splittable = False`` is computed on the whole
            batch (a warning says so).
        clip_norm: clip the active gradients to this global norm (``None``: no clipping).
        compute_dtype: ``"bfloat16"`` casts the trainable parameters for the forward/backward
            pass (parameters, gradients and optimizer state stay float32).
        skip_nonfinite: keep the old parameters/optimizer state when the loss or a gradient is
            not finite (decided inside the step: no host sync), and count it.
        has_aux: whether ``loss_fn`` returns ``(loss, aux_metrics_dict)``; ``None`` decides from
            what it returns (a pair whose second item is a dict).
        impl: ``"jit"`` (XLA inserts the collectives) or ``"shard_map"`` (explicit ``psum``).
        donate: donate the state's buffers to the step.
        metrics: ``"full"`` (default) returns every metric `TrainStep` documents;
            ``"minimal"`` leaves out ``update_norm`` (a second global reduction over every
            updated leaf, and its cross-device all-reduce, each step). Parameters and
            optimizer state are identical either way; the non-finite guard still sees
            ``loss`` and ``grad_norm``.
    """

    grad_accum: int = 1
    clip_norm: float | None = None
    compute_dtype: str | None = None
    skip_nonfinite: bool = True
    has_aux: bool | None = None
    impl: Literal["jit", "shard_map"] = "jit"
    donate: bool = True
    metrics: Literal["full", "minimal"] = "full"

    def __post_init__(self):
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum!r} must be an integer >= 1.")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm={self.clip_norm!r} must be > 0, or None for no clipping.")
        if self.compute_dtype not in (None, *COMPUTE_DTYPES):
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; use None or one of "
                             f"{', '.join(COMPUTE_DTYPES)}.")
        if self.impl not in STEP_IMPLS:
            raise ValueError(f"impl={self.impl!r}; use one of {', '.join(STEP_IMPLS)}.")
        if self.metrics not in STEP_METRICS:
            raise ValueError(f"metrics={self.metrics!r}; use one of {', '.join(STEP_METRICS)}.")


def _cast(tree: Any, dtype: str | None) -> Any:
    if dtype in (None, "float32"):
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def _microbatches(batch: Any, n: int) -> Any:
    # Strided split: micro-batch i takes rows i, i+n, ... so that each device's contiguous slice
    # of the batch splits into n local micro-batches without moving data between devices.
    def split(x):
        if x.shape[0] % n:
            raise ValueError(
                f"batch dimension {x.shape[0]} is not divisible by grad_accum={n}; use a batch "
                f"size that is a multiple of grad_accum (times the batch shards)."
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _accumulate(fn: Callable, mbs: Any, keys: Any) -> Any:
    """``sum_i fn(micro-batch i, key i)``. The first micro-batch seeds the carry (so its types,
    shard_map's varying axes included, are exactly those the body produces); scan adds the rest."""
    first = fn(jax.tree.map(lambda x: x[0], mbs), None if keys is None else keys[0])

    def body(carry, xs):
        return jax.tree.map(jnp.add, carry, fn(*xs)), None

    rest = (jax.tree.map(lambda x: x[1:], mbs), None if keys is None else keys[1:])
    out, _ = jax.lax.scan(body, first, rest)
    return out


def _sum_over_devices(axes: tuple[str, ...]) -> Callable[[jax.Array], jax.Array]:
    """``psum`` over those of ``axes`` a value still varies along (inside ``shard_map``)."""
    def total(x):
        aval = jax.typeof(x)
        kind = getattr(aval, "manual_axis_type", None)
        vma = kind.varying if kind is not None else getattr(aval, "vma", axes)
        varying = tuple(a for a in axes if a in vma)
        return jax.lax.psum(x, varying) if varying else x

    return total


def _value(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = den > 0
    return jnp.sum(jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0))


class TrainStep:
    """The system's sharded train step, compiled once per set of active blocks.

    Call ``step(state, batch, active=("param",))`` -> ``(state, metrics)``. ``metrics`` holds
    device scalars (read them only at log points): ``loss``, ``grad_norm``, ``update_norm``,
    ``finite``, ``nonfinite_count`` (skipped updates so far), ``lr_<block>`` when the block's
    optimizer injects its learning rate, and the loss function's aux metrics
    (``StepOptions(metrics="minimal")``: all but ``update_norm``).

    ``loss_fn(model, batch[, key=...])`` returns a scalar, a `Ratio`, or either with an aux dict
    (``(loss, {"name": scalar})``). When it accepts a keyword argument ``key`` it gets a fresh
    PRNG key each step, ``fold_in(state.key, state.step)`` (micro-batch ``i`` of an accumulated
    step: ``fold_in`` of that with ``i``): the same on every process, after a resume and on any
    mesh. Models with dropout draw per-example keys from it (e.g. ``jax.random.split(key, n)``).

    Raises:
        ValueError: an unknown block, or ``impl="shard_map"`` with a loss that cannot be split
            over devices (``splittable = False``).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        optimizers: Mapping[str, optax.GradientTransformation],
        blocks: Mapping[str, Any],
        *,
        mesh: Mesh,
        state_shardings: Any,
        options: StepOptions = StepOptions(),
    ):
        splittable = getattr(loss_fn, "splittable", True)
        if not splittable and options.impl == "shard_map":
            raise ValueError(f"the loss {getattr(loss_fn, '__name__', loss_fn)!r} cannot be split "
                             "over devices (splittable=False); use impl='jit'.")
        if not splittable and options.grad_accum > 1:
            log.warning("the loss %r cannot be split into micro-batches (splittable=False): "
                        "grad_accum=%d is ignored, each step computes the whole batch at once",
                        getattr(loss_fn, "__name__", loss_fn), options.grad_accum)
            options = dataclasses.replace(options, grad_accum=1)
        self.loss_fn = loss_fn
        self.optimizers = dict(optimizers)
        self.blocks = dict(blocks)
        self.mesh = mesh
        self.options = options
        self.takes_key = takes_argument(loss_fn, "key")
        self._state_sh = eqx.filter(state_shardings, lambda x: isinstance(x, NamedSharding))
        self._batch_sh = NamedSharding(mesh, batch_spec(mesh))
        self._axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
        self._compiled: dict[Any, Callable] = {}
        self._fast: dict[Any, tuple] = {}
        self.trace_counts: dict[tuple[str, ...], int] = {}
        self.multi_steps: dict[Any, Any] = {}  # `core.multistep.for_step`'s, by batch layout

    # -- the loss as (terms, aux) ---------------------------------------------------------------
    def _terms(self, diff, static_arrays, static_rest, batch, key) -> tuple[Ratio, dict]:
        model = eqx.combine(_cast(diff, self.options.compute_dtype), static_arrays, static_rest)
        out = self.loss_fn(model, batch, key=key) if self.takes_key else self.loss_fn(model, batch)
        has_aux = self.options.has_aux
        if has_aux is None:
            has_aux = isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("has_aux=True, but the loss did not return (loss, aux_dict).")
            loss, aux = out
        else:
            loss, aux = out, {}
        return as_ratio(loss), {k: jnp.asarray(v, jnp.float32) for k, v in dict(aux).items()}

    def _total(self, x):
        """Sum over the batch shards (identity under jit, where arrays are global)."""
        return jax.lax.psum(x, self._axes) if self.options.impl == "shard_map" else x

    def _loss_and_grad(self, diff, static_arrays, static_rest, batch, key):
        """``(loss, aux, grads)`` of the global batch, exact for `Ratio` losses: denominators are
        summed over micro-batches (and devices) first, then each part's numerator is divided by
        the total and differentiated."""
        n = self.options.grad_accum
        terms = lambda d, b, k: self._terms(d, static_arrays, static_rest, b, k)  # noqa: E731

        def weighted(d, b, k, den=None):
            r, aux = terms(d, b, k)
            if den is None:  # one batch: its own denominators, summed over the devices
                den = self._total(jax.lax.stop_gradient(r.den))
            return _value(r.num, den), aux

        grad_fn = jax.value_and_grad(weighted, has_aux=True)
        if n == 1:
            (loss, aux), grads = grad_fn(diff, batch, key)
            return loss, aux, grads
        mbs = _microbatches(batch, n)
        keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(
            jnp.arange(n))
        # Pass 1: denominators only (data weights); XLA drops the rest of this forward pass.
        den = _accumulate(lambda b, k: jax.lax.stop_gradient(terms(diff, b, k)[0].den), mbs, keys)
        den = self._total(den)

        def part(b, k):
            (loss, aux), grads = grad_fn(diff, b, k, den)
            return loss, aux, grads

        loss, aux, grads = _accumulate(part, mbs, keys)
        return loss, jax.tree.map(lambda a: a / n, aux), grads

    def _grads(self, diff, static_arrays, static_rest, batch, key):
        if self.options.impl == "jit":
            return self._loss_and_grad(diff, static_arrays, static_rest, batch, key)

        def local(d, sa, b, k):
            # Gradients w.r.t. the replicated parameters come back summed over the devices
            # already (shard_map's transpose of the implicit broadcast); the loss is this
            # device's share of the global sum.
            loss, aux, grads = self._loss_and_grad(d, sa, static_rest, b, k)
            total = lambda x: jax.tree.map(_sum_over_devices(self._axes), x)  # noqa: E731
            return total(loss), jax.lax.pmean(aux, self._axes), total(grads)

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(P(), P(), batch_spec(self.mesh), P()),
            out_specs=P(),
        )(diff, static_arrays, batch, key)

    def _step(self, arrays, static, batch, active):
        self.trace_counts[active] = self.trace_counts.get(active, 0) + 1
        state: TrainState = eqx.combine(arrays, static)
        model = state.model
        mask = union(*(self.blocks[b] for b in active))
        diff, frozen = eqx.partition(model, mask)
        static_arrays, static_rest = eqx.partition(frozen, eqx.is_array)
        key = jax.random.fold_in(state.key, state.step) if self.takes_key else None
        loss, aux, grads = self._grads(diff, static_arrays, static_rest, batch, key)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a NaN/inf anywhere shows here
        if self.options.clip_norm is not None:
            grads, _ = optax.clip_by_global_norm(self.options.clip_norm).update(
                grads, optax.EmptyState()
            )
        new_model, new_opt = model, dict(state.opt_state)
        full = self.options.metrics == "full"
        sq_update = jnp.zeros((), jnp.float32)
        metrics: dict[str, jax.Array] = {}
        for b in active:
            g_b = eqx.filter(grads, self.blocks[b])
            p_b = eqx.filter(model, self.blocks[b])
            u_b, new_opt[b] = self.optimizers[b].update(g_b, state.opt_state[b], p_b)
            u_b = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), u_b)
            if full:
                sq_update += optax.tree.norm(u_b) ** 2
            new_model = eqx.apply_updates(new_model, u_b)
            lr = current_learning_rate(new_opt[b])  # the rate this update used
            if lr is not None:
                metrics[f"lr_{b}"] = jnp.asarray(lr, jnp.float32) * state.lr_scale
        if self.options.skip_nonfinite:
            new_model = tree_where(finite, new_model, model)
            new_opt = {b: tree_where(finite, new_opt[b], state.opt_state[b]) for b in new_opt}
        new_state = dataclasses.replace(
            state,
            step=state.step + 1,
            model=new_model,
            opt_state=new_opt,
            nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
        )
        metrics.update(loss=loss, grad_norm=grad_norm)
        if full:
            metrics["update_norm"] = jnp.sqrt(sq_update)
        metrics.update(finite=finite.astype(jnp.int32),
                       nonfinite_count=new_state.nonfinite_count, **aux)
        return eqx.filter(new_state, eqx.is_array), metrics

    def compiled(self, state: TrainState, active: Sequence[str]) -> tuple[Callable, Any]:
        """The jitted step for ``active`` blocks and ``state``'s static structure."""
        active = tuple(active)
        unknown = [b for b in active if b not in self.blocks]
        if unknown:
            raise ValueError(f"unknown block(s) {unknown}; this step has {list(self.blocks)}.")
        arrays, static = eqx.partition(state, eqx.is_array)
        treedef = jax.tree.structure(static)
        key = (active, treedef, tuple(map(_hashable, jax.tree.leaves(static))))
        fn = self._compiled.get(key)
        if fn is None:
            rep = NamedSharding(self.mesh, P())
            fn = jax.jit(
                lambda a, b: self._step(a, static, b, active),
                in_shardings=(self._state_sh, self._batch_sh),
                out_shardings=(self._state_sh, rep),
                donate_argnums=(0,) if self.options.donate else (),
            )
            self._compiled[key] = fn
        return fn, static

    def __call__(self, state: TrainState, batch: Any, active: Sequence[str]):
        # Fast path (the per-step Python cost matters when steps are short): one C++ flatten,
        # a cache keyed by (active blocks, treedef), identity checks on the few static leaves.
        leaves, treedef = jax.tree.flatten(state)
        entry = self._fast.get((tuple(active), treedef))
        if entry is not None:
            fn, idx, statics, arrays_def = entry
            if all(leaves[i] is v for i, v in statics) and (
                    not self.options.donate or len({id(leaves[i]) for i in idx}) == len(idx)):
                new_arrays, metrics = fn(arrays_def.unflatten([leaves[i] for i in idx]), batch)
                for i, a in zip(idx, jax.tree.leaves(new_arrays), strict=False):
                    leaves[i] = a
                return treedef.unflatten(leaves), metrics
        if self.options.donate and aliased_leaves(state):  # (buffers: once per structure)
            state = dealias(state)  # XLA cannot be handed one buffer twice to donate
            leaves = jax.tree.leaves(state)
        fn, static = self.compiled(state, active)
        arrays = eqx.filter(state, eqx.is_array)
        idx = [i for i, x in enumerate(leaves) if eqx.is_array(x)]
        statics = [(i, x) for i, x in enumerate(leaves) if not eqx.is_array(x)]
        self._fast[(tuple(active), treedef)] = (fn, idx, statics, jax.tree.structure(arrays))
        new_arrays, metrics = fn(arrays, batch)
        return eqx.combine(new_arrays, static), metrics


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return id(x)
