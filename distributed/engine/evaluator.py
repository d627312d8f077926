"""The one evaluator: scores every row of a data set, on the mesh, in inference mode.

Rows are cut into chunks of whole shards; the last chunk is padded (by repeating row 0) and the
padding is masked out, so no row is dropped and none counts twice. Metrics are computed per
example (``jax.vmap`` over rows, each row a batch of one) and reduced as `Ratio` sums: the result
equals the metric on the whole set at once, for means, masked means and weighted means alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..core.losses import takes_argument
from ..core.mesh import batch_shard_count
from ..core.ratio import Ratio, as_ratio
from ..core.sharding import batch_sharding, batch_spec

_VALID = "__valid__"
_EVAL_KEY_SEED = 0


def make_eval_step(
    metric_fn: Callable[[Any, Any], Any], *, mesh: Mesh, model_shardings: Any
) -> Callable[[Any, Any], Any]:
    """Jit ``metric_fn(model, batch) -> pytree`` with the model's and batch's shardings.

    The outputs are replicated; nothing is donated (the model is reused by the next train
    step). One compilation per static structure of the model (e.g. training vs inference mode).
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


def _hashable(x: Any) -> Any:
    try:
        hash(x)
        return x
    except TypeError:
        return id(x)


def _call(fn: Callable, model: Any, batch: Any, takes_key: bool) -> Mapping[str, Any]:
    out = fn(model, batch, key=jax.random.key(_EVAL_KEY_SEED)) if takes_key else fn(model, batch)
    if not isinstance(out, Mapping):
        out = {"loss": out}
    return out


class Evaluator:
    """Evaluate a model on every row of ``arrays``.

    Args:
        metric_fn: ``(model, batch[, key=...]) -> {name: value}`` (or one value, named
            ``"loss"``), where a value is a scalar (a mean over the batch's examples), a `Ratio`,
            or, for the names in ``outputs``, a per-example array of shape ``(batch, ...)``.
            It is called with batches of one example (vmapped), unless it has
            ``splittable = False``: then once, on all rows together.
        arrays: ``{name: (N, ...) array}``.
        mesh: rows are split over the mesh's batch axes.
        model_shardings: the model's shardings (e.g. ``shardings.model`` of `init_state`).
        batch_size: rows per chunk (rounded up to whole shards).
        outputs: names of per-example outputs to gather (`predict`).

    Calling it, ``evaluator(model_or_state)``, returns ``{name: float}`` for every non-output
    name. Models are evaluated in inference mode (``eqx.nn.inference_mode``: dropout off).
    """

    def __init__(self, metric_fn: Callable[..., Any], arrays: Mapping[str, Any], *, mesh: Mesh,
                 model_shardings: Any, batch_size: int = 256, outputs: tuple[str, ...] = ()):
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.n = len(next(iter(arrays.values())))
        self.outputs = tuple(outputs)
        self.splittable = getattr(metric_fn, "splittable", True)
        takes_key = takes_argument(metric_fn, "key")
        if self.splittable:
            shards = batch_shard_count(mesh)
            chunk = rows_per_chunk(self.n, batch_size, shards)
            sharding = batch_sharding(mesh)
            self._chunks = []
            for i in range(0, self.n, chunk):
                part = {k: v[i:i + chunk] for k, v in arrays.items()}
                valid = len(next(iter(part.values())))
                part = {k: np.concatenate([v, np.repeat(v[:1], chunk - valid, 0)])
                        for k, v in part.items()}
                part[_VALID] = (np.arange(chunk) < valid).astype(np.float32)
                self._chunks.append(({k: jax.device_put(v, sharding) for k, v in part.items()},
                                     valid))
            reduce = self._per_example(metric_fn, takes_key)
        else:
            whole = {k: jax.device_put(v, NamedSharding(mesh, P())) for k, v in arrays.items()}
            self._chunks = [(whole, self.n)]
            reduce = self._whole(metric_fn, takes_key)
        self._run = make_eval_step(reduce, mesh=mesh, model_shardings=model_shardings)

    def _per_example(self, metric_fn: Callable, takes_key: bool) -> Callable:
        outputs = self.outputs

        def one(model, row):
            out = _call(metric_fn, model, jax.tree.map(lambda a: a[None], row), takes_key)
            return {k: (v[0] if k in outputs else as_ratio(v)) for k, v in out.items()}

        def reduce(model, batch):
            batch = dict(batch)
            valid = batch.pop(_VALID)
            per = jax.vmap(lambda row: one(model, row))(batch)
            sums, outs = {}, {}
            for k, v in per.items():
                if k in outputs:
                    outs[k] = v
                else:
                    w = valid[:, None]
                    sums[k] = (jnp.sum(w * v.num, 0), jnp.sum(w * v.den, 0))
            return sums, outs

        return reduce

    def _whole(self, metric_fn: Callable, takes_key: bool) -> Callable:
        outputs = self.outputs

        def reduce(model, batch):
            out = _call(metric_fn, model, batch, takes_key)
            sums = {k: (as_ratio(v).num, as_ratio(v).den) for k, v in out.items()
                    if k not in outputs}
            return sums, {k: v for k, v in out.items() if k in outputs}

        return reduce

    def _sums(self, model: Any) -> tuple[dict[str, tuple], list[tuple[dict, int]]]:
        """``({name: (num, den)}, [(outputs, valid rows) per chunk])`` on the host."""
        model = eqx.nn.inference_mode(model.model if _is_state(model) else model)
        totals: dict[str, Any] = {}
        outs: list[tuple[dict, int]] = []
        for chunk, valid in self._chunks:
            sums, out = self._run(model, chunk)
            for k, (num, den) in sums.items():
                totals[k] = (num, den) if k not in totals else (totals[k][0] + num,
                                                                totals[k][1] + den)
            outs.append((out, valid))
        return jax.device_get((totals, outs))

    def _evaluate(self, model: Any) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        totals, outs = self._sums(model)
        scores = {k: float(Ratio(num, den).value()) for k, (num, den) in totals.items()}
        gathered = {k: np.concatenate([np.asarray(o[k])[:valid] for o, valid in outs])
                    for k in self.outputs}
        return scores, gathered

    def __call__(self, model: Any) -> dict[str, float]:
        """Scores of ``model`` (or a `TrainState`'s model): ``{name: float}``."""
        return self._evaluate(model)[0]

    def evaluate(self, model: Any) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """``(scores, outputs)``: the scores and each output for every row, in row order."""
        return self._evaluate(model)

    @property
    def num_chunks(self) -> int:
        return len(self._chunks)

    def __repr__(self) -> str:
        return f"Evaluator(rows={self.n}, chunks={self.num_chunks}, outputs={self.outputs})"


def _is_state(x: Any) -> bool:
    return hasattr(x, "model") and hasattr(x, "opt_state")


def rows_per_chunk(n: int, batch_size: int, shards: int) -> int:
    """Rows per evaluation chunk: ``batch_size`` (at most ``n``) rounded up to whole shards."""
    return max(shards, math.ceil(min(batch_size, n) / shards) * shards)
