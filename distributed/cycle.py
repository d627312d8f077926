"""WaveDiff's functional training API (seed 000) over the one engine: `train_epoch` and
`general_train_cycle`.

`train_epoch` is the seed's epoch of `make_step` calls over shuffled Grain mini-batches.
`general_train_cycle` runs a BCD cycle as ONE `run_loop` call: the phases of
`bcd.make_phase_plan` are switched by the global step inside the step function, each phase
calling the sharded `TrainStep` with its active blocks (one compile per phase kind); per-block
optax states live in the `TrainState` and survive across phases. Data come from a Grain dataset
(shuffled per epoch, deterministic in the key) prefetched onto the mesh.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import bcd
from .data import DataError, DevicePrefetcher, check_batch_size, epoch_batches, make_dataset
from .losses import l1_schedule_rule, total_loss
from .mesh import make_mesh
from .sharding import batch_sharding, shard, tree_shardings
from .state import TrainState, create_state
from .step import make_step

log = logging.getLogger("distributed")

PSF_KEYS = ("positions", "seds", "targets", "masks", "weights")
REQUIRED_HPARAMS = ("n_epochs_param", "n_epochs_nonparam", "lr_param", "lr_nonparam",
                    "batch_size")
HPARAM_DEFAULTS: dict[str, Any] = {"n_epochs_complete": 0, "l2_param": 1e-4, "l1_rate": 0.0,
                                   "cycle_def": "complete", "first_run": False}


# ------------------------------------------------------------------------------ shared helpers
def seed_from_key(key: jax.Array) -> int:
    """A non-negative Python int derived from a PRNG key (typed or raw)."""
    return int(jax.device_get(jax.random.randint(key, (), 0, 2**31 - 1)))


def _copy(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, tree)


def sharded_state(model, optimizers, blocks, *, key, mesh, strategy="auto"):
    """A fresh `TrainState` laid out on ``mesh`` (arrays copied: the step donates its input,
    and the caller's model must stay valid). Returns ``(state, shardings)``."""
    state = _copy(create_state(model, optimizers, blocks, key=key))
    shardings = tree_shardings(state, mesh, strategy=strategy)
    return shard(state, shardings), shardings


def default_mesh(mesh):
    return make_mesh("data:-1") if mesh is None else mesh


def check_batch(batch_size: int, n: int, mesh, what: str) -> None:
    try:
        check_batch_size(batch_size, num_examples=n, process_count=jax.process_count(), mesh=mesh)
    except DataError as e:
        raise ValueError(f"{what}: {e}") from None


def padded_chunks(arrays: Mapping[str, np.ndarray], chunk: int, shards: int):
    """Split ``arrays`` into equal chunks of ``chunk`` rows (a multiple of ``shards``), the last
    padded by repeating row 0; yields ``(chunk_dict, n_valid)``."""
    n = len(next(iter(arrays.values())))
    chunk = max(shards, -(-min(chunk, n) // shards) * shards)
    for i in range(0, n, chunk):
        part = {k: np.asarray(v[i:i + chunk]) for k, v in arrays.items()}
        valid = len(next(iter(part.values())))
        if valid < chunk:
            part = {k: np.concatenate([v, np.repeat(v[:1], chunk - valid, 0)]) for k, v in
                    part.items()}
        yield part, valid


class PhaseStepFn:
    """``train_step_fn(state, batch, key)`` for `run_loop` that follows a BCD phase plan.

    The phase is decided on the host from a step counter (no device reads per step); entering a
    phase applies the first-run rule (`bcd.enter_phase`). If the loop hands back a state other
    than the one last returned (a recovery rollback), the phase is re-read from that state.
    """

    def __init__(self, step, plan, steps_per_epoch, model_shardings, mesh,
                 extras: Callable[[int, int], dict[str, float]] | None = None):
        self.step, self.plan, self.spe = step, tuple(plan), steps_per_epoch
        self.model_shardings, self.mesh, self.extras = model_shardings, mesh, extras
        self.host_step: int | None = None
        self.phase: int = -1
        self._last: Any = None
        self._extra_cache: dict[tuple, jax.Array] = {}
        self.bounds = bcd.phase_boundaries(self.plan, steps_per_epoch)

    def _sync(self, state):
        self.host_step = int(jax.device_get(state.step))
        self.phase = int(jax.device_get(state.phase))

    def __call__(self, state: TrainState, batch: dict, key: Any):
        del key
        if self.host_step is None or (self._last is not None and state is not self._last):
            self._sync(state)
        p = bcd.phase_at(self.plan, self.host_step, self.spe)
        if p != self.phase:
            model = bcd.enter_phase(state.model, self.plan, self.phase, p)
            if model is not state.model:
                model = shard(model, self.model_shardings)
            phase = jax.device_put(jnp.asarray(p, jnp.int32), state.phase.sharding)
            state = dataclasses.replace(state, model=model, phase=phase)
            log.info("phase %d/%d: %s (blocks %s) from step %d", p + 1, len(self.plan),
                     self.plan[p].name, ",".join(self.plan[p].blocks), self.host_step)
            self.phase = p
        if self.extras is not None:
            epoch_in_phase = (self.host_step - self.bounds[p]) // self.spe
            rows = len(next(iter(batch.values())))
            for k, v in self.extras(p, epoch_in_phase).items():
                arr = self._extra_cache.get((k, v, rows))
                if arr is None:
                    arr = jax.device_put(np.full((rows,), v, np.float32),
                                         batch_sharding(self.mesh))
                    self._extra_cache[(k, v, rows)] = arr
                batch = dict(batch, **{k: arr})
        self.host_step += 1
        self._last, metrics = self.step(state, batch, self.plan[p].blocks)
        return self._last, metrics


# ------------------------------------------------------------------------------- seed tuples
def psf_arrays(data: Sequence, what: str) -> dict[str, np.ndarray]:
    """The seed tuple ``(positions, packed_seds, targets, masks[, sample_weights])`` as a dict
    of float32 arrays (weights default to ones)."""
    if isinstance(data, Mapping):
        data = tuple(data[k] for k in PSF_KEYS if k in data)
    if not isinstance(data, (tuple, list)) or len(data) not in (4, 5):
        raise ValueError(f"{what} must be a tuple (positions, packed_seds, targets, masks) with an "
                         f"optional 5th element of sample weights; got {type(data).__name__}"
                         f"{f' of length {len(data)}' if isinstance(data, (tuple, list)) else ''}.")
    arrays = [np.asarray(jax.device_get(a), np.float32) for a in data]
    n = len(arrays[0])
    bad = [f"{k}: {len(a)}" for k, a in zip(PSF_KEYS, arrays, strict=False)
           if a.ndim == 0 or len(a) != n]
    if bad:
        raise ValueError(f"{what}: every array needs the same number of stars ({n}); got {bad}.")
    if len(arrays) == 4:
        arrays.append(np.ones(n, np.float32))
    return dict(zip(PSF_KEYS, arrays, strict=False))


# ------------------------------------------------------------------------------- train_epoch
def train_epoch(model, opt_state, optimizer, data, batch_size, loss_fn, filter_spec, key, *,
                mesh=None, epoch: int = 0):
    """One epoch of `make_step` over shuffled mini-batches (seed 000's ``train_epoch``).

    Args:
        model, opt_state, optimizer, loss_fn, filter_spec: as for `make_step`; ``loss_fn(model,
            batch)`` gets each batch as a tuple in the order of ``data``.
        data: a tuple of arrays sharing their leading (example) dimension.
        batch_size: examples per mini-batch (the last partial batch is dropped; a dataset
            smaller than one batch is used whole).
        key: PRNG key: the shuffle order is a deterministic function of it (via Grain).
        mesh: optionally, put each batch on this mesh (split over its batch axes).
        epoch: the epoch number mixed into the shuffle.

    Returns:
        ``(model, opt_state, epoch_loss)``: the mean of the batch losses, as a float.
    """
    if not isinstance(data, (tuple, list)) or not data:
        raise ValueError("train_epoch: data must be a non-empty tuple of arrays.")
    arrays = {str(i): np.asarray(jax.device_get(a)) for i, a in enumerate(data)}
    n = len(arrays["0"])
    batches = epoch_batches(arrays, global_batch_size=min(int(batch_size), n),
                            seed=seed_from_key(key), epoch=epoch)
    losses = []
    for host in batches:
        if mesh is not None:
            from .data import to_global

            host = to_global(host, mesh)
        batch = tuple(host[str(i)] for i in range(len(data)))
        model, opt_state, loss = make_step(model, opt_state, optimizer, batch, loss_fn,
                                           filter_spec)
        losses.append(loss)
    return model, opt_state, float(np.mean(jax.device_get(losses)))


# ----------------------------------------------------------------------- general_train_cycle
def _hparams(h: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_HPARAMS if k not in h]
    if missing:
        raise ValueError(f"training_hparams is missing {missing}; it needs {list(REQUIRED_HPARAMS)}"
                         f" (optional: {HPARAM_DEFAULTS}).")
    unknown = sorted(set(h) - set(REQUIRED_HPARAMS) - set(HPARAM_DEFAULTS))
    if unknown:
        raise ValueError(f"training_hparams has unknown key(s) {unknown}; valid keys: "
                         f"{[*REQUIRED_HPARAMS, *HPARAM_DEFAULTS]}.")
    h = {**HPARAM_DEFAULTS, **h}
    for k in ("lr_param", "lr_nonparam"):
        if not (isinstance(h[k], (int, float)) and h[k] > 0 and math.isfinite(h[k])):
            raise ValueError(f"training_hparams[{k!r}]={h[k]!r} must be a number > 0.")
    for k in ("l2_param", "l1_rate"):
        if not (isinstance(h[k], (int, float)) and h[k] >= 0):
            raise ValueError(f"training_hparams[{k!r}]={h[k]!r} must be a number >= 0.")
    b = h["batch_size"]
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise ValueError(f"training_hparams['batch_size']={b!r} must be a positive integer.")
    return h


def general_train_cycle(model, train_data, val_data, training_hparams, key, *, mesh=None,
                        loss_fn=None, filter_specs: Mapping[str, Any] | None = None,
                        optimizers: Mapping[str, Any] | None = None, show_progress=False,
                        **loop_options) -> dict[str, Any]:
    """Multi-phase BCD training of a semi-parametric model (seed 000's ``general_train_cycle``).

    Args:
        model: names its blocks (``param_fields`` / ``nonparam_fields``), or pass
            ``filter_specs={"param": ..., "nonparam": ...}``; ``first_run`` needs
            ``set_alpha_zero`` / ``set_alpha_identity``.
        train_data, val_data: ``(positions, packed_seds, targets, masks[, sample_weights])``;
            ``val_data`` may be None (no validation).
        training_hparams: ``n_epochs_param``, ``n_epochs_nonparam``, ``n_epochs_complete``,
            ``lr_param``, ``lr_nonparam``, ``batch_size`` (global), ``l2_param``, ``l1_rate``
            (halved every 10 epochs of each phase by `l1_schedule_rule`), ``cycle_def``,
            ``first_run``.
        key: PRNG key (data shuffling and the state's key).
        mesh: device mesh (default: all devices, data parallel).
        loss_fn: ``(model, batch_tuple) -> loss`` replacing `total_loss` (then ``l2_param`` and
            ``l1_rate`` are not used); also the validation loss, on the whole val set (else
            the validation loss is the weighted masked MSE, the data term of `total_loss`).
        optimizers: ``{"param": tx, "nonparam": tx}`` replacing Adam (TF defaults) at
            ``lr_param`` / ``lr_nonparam``.
        **loop_options: passed to `run_loop` (callbacks, hooks, checkpoint_dir, recovery, ...).

    Returns:
        ``{"model", "train_losses", "val_losses", "phases": [{"name", "blocks", "epochs",
        "train_losses", "val_losses"}], "history", "state"}`` (losses per epoch).
    """
    from .loop import run_loop
    from .optim import configure_optimizer
    from .step import StepOptions, TrainStep, make_eval_step

    h = _hparams(training_hparams)
    mesh = default_mesh(mesh)
    plan = bcd.make_phase_plan(h["cycle_def"], epochs_param=h["n_epochs_param"],
                               epochs_nonparam=h["n_epochs_nonparam"],
                               epochs_complete=h["n_epochs_complete"], first_run=h["first_run"])
    train = psf_arrays(train_data, "train_data")
    val = None if val_data is None else psf_arrays(val_data, "val_data")
    n_items = len(train_data) if isinstance(train_data, (tuple, list)) else 5
    n = len(train["positions"])
    check_batch(h["batch_size"], n, mesh, "training_hparams['batch_size']")
    spe = n // h["batch_size"]

    blocks = dict(filter_specs) if filter_specs is not None else bcd.model_blocks(model)
    bcd.check_blocks(model, blocks)
    if optimizers is None:
        optimizers = {bcd.PARAM: configure_optimizer(h["lr_param"]),
                      bcd.NONPARAM: configure_optimizer(h["lr_nonparam"])}
    state_key, data_key = jax.random.split(key)
    state, shardings = sharded_state(model, optimizers, blocks, key=state_key, mesh=mesh)

    if loss_fn is None:
        l2, use_l1 = h["l2_param"], h["l1_rate"] > 0

        def step_loss(m, b):
            l1 = jnp.mean(b["l1_rate"]) if use_l1 else 0.0
            return total_loss(m, b["positions"], b["seds"], b["targets"], b["masks"],
                              sample_weight=b["weights"], l2_param=l2, l1_rate=l1)
    else:
        def step_loss(m, b):
            return loss_fn(m, tuple(b[k] for k in PSF_KEYS[:n_items]))

    step = TrainStep(step_loss, optimizers, blocks, mesh=mesh, state_shardings=shardings,
                     options=StepOptions())
    extras = None
    if loss_fn is None and h["l1_rate"] > 0:
        extras = lambda p, e: {"l1_rate": l1_schedule_rule(e, h["l1_rate"])}  # noqa: E731
    step_fn = PhaseStepFn(step, plan, spe, shardings.model, mesh, extras)

    seed = seed_from_key(data_key)
    data_it = DevicePrefetcher(iter(make_dataset(train, global_batch_size=h["batch_size"],
                                                 seed=seed, num_epochs=None)), mesh, size=2)
    val_step_fn = val_batches = None
    if val is not None and loss_fn is not None:  # the user's loss on the whole val set
        from jax.sharding import NamedSharding, PartitionSpec

        n_val = len(val_data) if isinstance(val_data, (tuple, list)) else 5
        val_tuple = jax.device_put(tuple(val[k] for k in PSF_KEYS[:n_val]),
                                   NamedSharding(mesh, PartitionSpec()))
        val_loss = eqx.filter_jit(loss_fn)
        val_step_fn = lambda s, b, k: (s, {"loss": val_loss(s.model, b)})  # noqa: E731
        val_batches = [val_tuple]
    elif val is not None:
        val_step_fn, val_batches = _psf_validation(val, h["batch_size"], mesh, shardings.model,
                                                   make_eval_step)
    total_epochs = sum(p.epochs for p in plan)
    state, result = run_loop(state, step_fn, data_iterator=data_it, num_epochs=total_epochs,
                             num_batches=spe, val_step_fn=val_step_fn,
                             val_data_iterator=val_batches, show_progress=show_progress,
                             log_every=loop_options.pop("log_every", total_epochs * spe + 1),
                             **loop_options)
    hist = result.history
    train_losses, val_losses = hist.get("train_loss", []), hist.get("val_loss", [])
    phases, start = [], 0
    for p in plan:
        stop = start + p.epochs
        phases.append({"name": p.name, "blocks": p.blocks, "epochs": p.epochs,
                       "first_epoch": start, "train_losses": train_losses[start:stop],
                       "val_losses": val_losses[start:stop]})
        start = stop
    return {"model": state.model, "train_losses": train_losses, "val_losses": val_losses,
            "phases": phases, "history": hist, "state": state}


def _psf_validation(val, batch_size, mesh, model_shardings, make_eval_step):
    """A val step over the whole validation set: the weighted masked MSE (the data term of
    `total_loss`), exact (zero-weight padding rows, sums accumulated on device)."""
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp") if a in mesh.axis_names)
    chunks = []
    for part, valid in padded_chunks(val, batch_size, shards):
        if valid < len(part["weights"]):
            part["weights"][valid:] = 0.0  # a fresh array (padded by concatenation)
        chunks.append({k: jax.device_put(v, batch_sharding(mesh)) for k, v in part.items()})

    def sums(model, b):
        pred = model(b["positions"], b["seds"])
        keep = (1.0 - b["masks"]) * b["weights"][:, None, None]
        return {"sse": jnp.sum(keep * jnp.square(pred - b["targets"])), "den": jnp.sum(keep)}

    evaluate = make_eval_step(sums, mesh=mesh, model_shardings=model_shardings)

    def val_step_fn(state, batch, key):
        out = [evaluate(state.model, c) for c in batch]
        sse = sum(o["sse"] for o in out)
        den = sum(o["den"] for o in out)
        return state, {"loss": jnp.where(den > 0, sse / jnp.maximum(den, 1e-30), 0.0)}

    return val_step_fn, [chunks]
