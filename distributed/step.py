"""The pure train step: partition by filter spec, grad of the active block, update, combine.

Two ways in:

- `make_step` — the seed's functional API, ``(model, opt_state, optimizer, batch, loss_fn,
  filter_spec) -> (model, opt_state, loss)``, jitted once per filter spec.
- `TrainStep` — the system's step over a `TrainState` with per-block optimizers: compiled once
  per set of active blocks with explicit in/out shardings and donation ("pjit style"), or as a
  `shard_map` twin with explicit ``pmean`` over the batch axes; options for micro-batch gradient
  accumulation, global-norm clipping, a bf16 compute policy and skipping non-finite updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .bcd import union
from .mesh import BATCH_AXES
from .optim import current_learning_rate
from .sharding import batch_spec
from .state import TrainState

LossFn = Callable[..., Any]


# --------------------------------------------------------------------------- the seed's make_step
def _seed_step(model, opt_state, optimizer, batch, loss_fn, filter_spec):
    diff, static = eqx.partition(model, filter_spec)
    loss, grads = jax.value_and_grad(lambda d: loss_fn(eqx.combine(d, static), batch))(diff)
    updates, opt_state = optimizer.update(grads, opt_state, diff)
    return eqx.apply_updates(model, updates), opt_state, loss


_seed_step_jit = eqx.filter_jit(_seed_step)
_seed_step_jit_donate = eqx.filter_jit(_seed_step, donate="all")


def make_step(model, opt_state, optimizer, batch, loss_fn, filter_spec, *, donate: bool = False):
    """One optimizer step on the parameters selected by ``filter_spec`` (seed 000's API).

    Gradients are taken only for the selected arrays; every other leaf of ``model`` is returned
    bit for bit. Arrays keep the shardings they come in with (shard the model and batch over a
    mesh first, e.g. with `distributed.sharding.shard`), so this is data/FSDP parallel when the
    inputs are. Compiled once per filter spec (and optimizer, loss and shapes).

    Args:
        model: the Equinox model.
        opt_state: ``optimizer.init(eqx.filter(model, filter_spec))``.
        optimizer: an optax transformation.
        batch: any pytree of arrays, passed to ``loss_fn``.
        loss_fn: ``(model, batch) -> scalar loss``.
        filter_spec: ``PyTree[bool]`` mirroring the model (e.g. `param_filter(model)`).
        donate: donate the input buffers (saves memory; the inputs may not be used again).
            Off by default, so the originals stay valid as the seed documents.

    Returns:
        ``(new_model, new_opt_state, loss)``.
    """
    fn = _seed_step_jit_donate if donate else _seed_step_jit
    return fn(model, opt_state, optimizer, batch, loss_fn, filter_spec)


# ------------------------------------------------------------------------------- the system step
@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Options of `TrainStep`.

    Attributes:
        grad_accum: micro-batches per step (``lax.scan``); the batch must split evenly.
        clip_norm: clip the active gradients to this global norm (``None``: no clipping).
        compute_dtype: ``"bfloat16"`` casts the trainable parameters for the forward/backward
            pass (parameters, gradients and optimizer state stay float32).
        skip_nonfinite: keep the old parameters/optimizer state when the loss or a gradient is
            not finite (decided inside the step: no host sync), and count it.
        has_aux: ``loss_fn`` returns ``(loss, aux_metrics_dict)``.
        impl: ``"jit"`` (XLA inserts the collectives) or ``"shard_map"`` (explicit ``pmean``).
        donate: donate the state's buffers to the step.
    """

    grad_accum: int = 1
    clip_norm: float | None = None
    compute_dtype: str | None = None
    skip_nonfinite: bool = True
    has_aux: bool = False
    impl: Literal["jit", "shard_map"] = "jit"
    donate: bool = True

    def __post_init__(self):
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum!r} must be an integer >= 1.")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm={self.clip_norm!r} must be > 0, or None for no clipping.")
        if self.compute_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"compute_dtype={self.compute_dtype!r}; use None, 'float32', 'bfloat16' or "
                f"'float16'."
            )
        if self.impl not in ("jit", "shard_map"):
            raise ValueError(f"impl={self.impl!r}; use 'jit' or 'shard_map'.")


def tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o) if eqx.is_array(n) else n, new, old)


def _cast(tree: Any, dtype: str | None) -> Any:
    if dtype in (None, "float32"):
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree
    )


def _find_learning_rate(opt_state: Any) -> jax.Array | None:
    """The learning rate an `optax.inject_hyperparams` state carries, if any."""
    lr = current_learning_rate(opt_state)
    return None if lr is None else jnp.asarray(lr, jnp.float32)


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


class TrainStep:
    """The system's sharded train step, compiled once per set of active blocks.

    Call ``step(state, batch, active=("param",))`` -> ``(state, metrics)``. ``metrics`` holds
    device scalars (read them only at log points): ``loss``, ``grad_norm``, ``update_norm``,
    ``finite``, ``lr_<block>`` when the block's optimizer injects its learning rate, and the
    loss function's aux metrics.
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
        self.loss_fn = loss_fn
        self.optimizers = dict(optimizers)
        self.blocks = dict(blocks)
        self.mesh = mesh
        self.options = options
        self._state_sh = eqx.filter(state_shardings, lambda x: isinstance(x, NamedSharding))
        self._batch_sh = NamedSharding(mesh, batch_spec(mesh))
        self._compiled: dict[Any, Callable] = {}
        self._fast: dict[Any, tuple] = {}
        self.trace_counts: dict[tuple[str, ...], int] = {}

    # -- gradient of the loss w.r.t. the active arrays, averaged over the global batch ----------
    def _loss_and_grad(self, diff, static_arrays, static_rest, batch):
        opts = self.options

        def f(d, mb):
            model = eqx.combine(_cast(d, opts.compute_dtype), static_arrays, static_rest)
            out = self.loss_fn(model, mb)
            loss, aux = out if opts.has_aux else (out, {})
            return jnp.asarray(loss, jnp.float32), aux

        grad_fn = jax.value_and_grad(f, has_aux=True)
        if opts.grad_accum == 1:
            (loss, aux), grads = grad_fn(diff, batch)
            return loss, aux, grads
        mbs = _microbatches(batch, opts.grad_accum)
        # The first micro-batch seeds the carry (so its types, incl. shard_map's varying-axis
        # types, are exactly those the body produces); the rest are accumulated by scan.
        (loss, aux), grads = grad_fn(diff, jax.tree.map(lambda x: x[0], mbs))

        def body(carry, mb):
            (loss, aux), grads = grad_fn(diff, mb)
            return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

        rest = jax.tree.map(lambda x: x[1:], mbs)
        (loss, aux, grads), _ = jax.lax.scan(body, (loss, aux, grads), rest)
        return jax.tree.map(lambda x: x / opts.grad_accum, (loss, aux, grads))

    def _grads(self, diff, static_arrays, static_rest, batch):
        if self.options.impl == "jit":
            return self._loss_and_grad(diff, static_arrays, static_rest, batch)
        axes = tuple(a for a in BATCH_AXES if a in self.mesh.axis_names)

        def local(d, sa, b):
            loss, aux, grads = self._loss_and_grad(d, sa, static_rest, b)
            return jax.lax.pmean((loss, aux, grads), axes)

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(P(), P(), batch_spec(self.mesh)),
            out_specs=P(),
        )(diff, static_arrays, batch)

    def _step(self, arrays, static, batch, active):
        self.trace_counts[active] = self.trace_counts.get(active, 0) + 1
        state: TrainState = eqx.combine(arrays, static)
        model = state.model
        mask = union(*(self.blocks[b] for b in active))
        diff, frozen = eqx.partition(model, mask)
        static_arrays, static_rest = eqx.partition(frozen, eqx.is_array)
        loss, aux, grads = self._grads(diff, static_arrays, static_rest, batch)

        finite = jnp.isfinite(loss) & jnp.all(
            jnp.array([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)] or [True])
        )
        grad_norm = optax.tree.norm(grads)
        if self.options.clip_norm is not None:
            grads, _ = optax.clip_by_global_norm(self.options.clip_norm).update(
                grads, optax.EmptyState()
            )
        new_model, new_opt = model, dict(state.opt_state)
        sq_update = jnp.zeros((), jnp.float32)
        metrics: dict[str, jax.Array] = {}
        for b in active:
            g_b = eqx.filter(grads, self.blocks[b])
            p_b = eqx.filter(model, self.blocks[b])
            u_b, new_opt[b] = self.optimizers[b].update(g_b, state.opt_state[b], p_b)
            u_b = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), u_b)
            sq_update += optax.tree.norm(u_b) ** 2
            new_model = eqx.apply_updates(new_model, u_b)
            lr = _find_learning_rate(new_opt[b])  # the rate this update used
            if lr is not None:
                metrics[f"lr_{b}"] = lr * state.lr_scale
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
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            update_norm=jnp.sqrt(sq_update),
            finite=finite.astype(jnp.int32),
            **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()},
        )
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
            if all(leaves[i] is v for i, v in statics):
                new_arrays, metrics = fn(arrays_def.unflatten([leaves[i] for i in idx]), batch)
                for i, a in zip(idx, jax.tree.leaves(new_arrays), strict=False):
                    leaves[i] = a
                return treedef.unflatten(leaves), metrics
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


def make_eval_step(
    metric_fn: Callable[[Any, Any], dict[str, jax.Array]], *, mesh: Mesh, model_shardings: Any
) -> Callable[[Any, Any], dict[str, jax.Array]]:
    """Jit ``metric_fn(model, batch) -> {name: scalar}`` with the model's and batch's shardings.

    Nothing is donated: the model is reused by the next train step.
    """
    model_sh = eqx.filter(model_shardings, lambda x: isinstance(x, NamedSharding))
    batch_sh = NamedSharding(mesh, batch_spec(mesh))
    cache: dict[Any, Callable] = {}

    def run(model, batch):
        arrays, static = eqx.partition(model, eqx.is_array)
        key = (jax.tree.structure(static), tuple(map(_hashable, jax.tree.leaves(static))))
        fn = cache.get(key)
        if fn is None:
            fn = jax.jit(
                lambda a, b: metric_fn(eqx.combine(a, static), b),
                in_shardings=(model_sh, batch_sh),
                out_shardings=NamedSharding(mesh, P()),
            )
            cache[key] = fn
        return fn(arrays, batch)

    return run
