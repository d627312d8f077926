"""`build`: the one assembly from a `Task` to the pieces the loop runs.

The command line, `Trainer`, `general_train_cycle` / `train_epoch` and the benchmarks all build
their training here, so every entry point gets the same sharded state, the same phase-following
step, the same input pipeline and the same evaluator.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from ..core import bcd
from ..core.clock import EpochClock
from ..core.ensemble import Ensemble
from ..core.ensemble import enter_phase as enter_members
from ..core.losses import takes_argument
from ..core.mesh import check_batch_size
from ..core.state import TrainState, init_state
from ..core.step import StepOptions, TrainStep
from ..data import DeviceData, DevicePrefetcher, make_dataset
from ..data.resident import fits
from .ensemble import EnsembleEvaluator, build_members
from .evaluator import Evaluator
from .phases import PhaseStep
from .task import Task

log = logging.getLogger(__name__)
DEVICE_DATA = ("auto", "on", "off")


@dataclasses.dataclass
class Engine:
    """What `build` assembles: hand ``state``, ``step_fn``, ``data``, ``clock`` and
    ``evaluator`` to `distributed.loop.run_loop`.

    Attributes:
        task: the task it was built from.
        mesh: the device mesh.
        clock: epochs on the step counter (``total_steps = clock.steps(total epochs)``).
        state: the sharded `TrainState` (step 0).
        shardings: the state's sharding tree.
        optimizers: ``{block: optax transformation}`` (a factory in the task, resolved).
        blocks: ``{block: filter spec}``.
        train_step: the compiled step (`TrainStep`).
        step_fn: the phase-following step (`PhaseStep`).
        data: the training input: the arrays on the devices (`DeviceData`, with which the
            loop runs many steps per dispatch) or a `DevicePrefetcher` over the Grain stream
            (``None`` when built without data).
        evaluator: the `Evaluator` of ``task.val`` (``None`` without validation data).
        ensemble: the members when built as an ensemble (then ``state`` holds them all,
            ``train_step`` is an `EnsembleStep` and the evaluators are `EnsembleEvaluator`s).
    """

    task: Task
    mesh: Mesh
    clock: EpochClock
    state: TrainState
    shardings: Any
    optimizers: dict[str, optax.GradientTransformation]
    blocks: dict[str, Any]
    train_step: TrainStep
    step_fn: PhaseStep
    data: Iterator | None
    evaluator: Evaluator | None
    ensemble: Ensemble | None = None

    @property
    def plan(self) -> tuple[bcd.Phase, ...]:
        return self.task.plan

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.task.plan)

    @property
    def total_steps(self) -> int:
        return self.clock.steps(self.total_epochs)

    def evaluator_for(self, arrays: dict, *, batch_size: int | None = None) -> Evaluator:
        """An `Evaluator` of other rows (e.g. a held-out test set) with the task's metrics."""
        cls = Evaluator if self.ensemble is None else EnsembleEvaluator
        return cls(self.task.metric_fn or _loss_metric(self.task.loss_fn), arrays,
                         mesh=self.mesh, model_shardings=self.shardings.model,
                         batch_size=batch_size or self.clock.batch_size,
                         outputs=self.task.outputs)


def _loss_metric(loss_fn):
    """The training loss as the evaluation metric ``{"loss": ...}`` (its aux dropped)."""
    takes_key = takes_argument(loss_fn, "key")

    def metric(model, batch, key=None):
        out = loss_fn(model, batch, key=key) if takes_key else loss_fn(model, batch)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
            out = out[0]
        return {"loss": out}

    metric.splittable = getattr(loss_fn, "splittable", True)
    return metric


def build(
    task: Task,
    *,
    mesh: Mesh,
    batch_size: int,
    seed: int,
    key: jax.Array,
    options: StepOptions | None = None,
    strategy: str = "auto",
    shuffle: bool = True,
    with_data: bool = True,
    prefetch: int = 2,
    eval_batch_size: int | None = None,
    train_step: TrainStep | None = None,
    ensemble: Ensemble | None = None,
    device_data: str = "auto",
    steps_per_call: int = 128,
) -> Engine:
    """Assemble a `Task` on ``mesh``.

    Args:
        task: what to train.
        mesh: the device mesh.
        batch_size: the global batch size.
        seed: the data order's seed (each epoch's permutation, `distributed.data`).
        key: the state's PRNG key (the per-step keys of a loss that takes ``key``).
        options: the train step's options (default `StepOptions()`).
        strategy: parameter sharding (`distributed.core.sharding.STRATEGIES`).
        shuffle: shuffle each epoch (else the rows in order, epoch after epoch).
        with_data: build the Grain input (off for callers bringing their own batches).
        prefetch: global batches kept on the devices ahead of the step.
        eval_batch_size: rows per evaluation chunk (default: ``batch_size``).
        train_step: the compiled step of an earlier `build` of the same task, mesh and
            options, to reuse (its compilations too) with this engine's fresh state.
        device_data: keep the training arrays on the devices and draw the batches there,
            running up to ``steps_per_call`` steps per dispatch (the same batches and results
            as the host pipeline): ``"auto"`` when they fit (`distributed.data.resident.fits`),
            ``"on"``, or ``"off"`` (the Grain host pipeline).
        steps_per_call: the most steps per dispatch with device data.
        ensemble: train K members at once (`distributed.core.ensemble`): ``task.model`` is
            then ``key -> model``, member ``i`` built from ``key(ensemble.init_seeds[i])``
            (``key`` above is unused), all members on the same batches.

    Raises:
        ValueError: a batch size that does not fit the data, mesh or processes; blocks that are
            empty or overlap; optimizers and blocks that name different blocks; an ensemble
            whose size does not split over the mesh's ``ensemble`` axis.
    """
    n = task.num_train
    check_batch_size(batch_size, mesh, jax.process_count(), num_examples=n)
    clock = EpochClock(n, batch_size)
    optimizers = task.optimizers
    if callable(optimizers):
        optimizers = optimizers(bcd.block_updates(task.plan, clock))
    optimizers = dict(optimizers)
    if ensemble is not None:
        state, shardings, train_step = build_members(
            task, optimizers, ensemble, mesh=mesh, strategy=strategy,
            options=options or StepOptions(), train_step=train_step)
    else:
        state, shardings = init_state(task.model, optimizers, task.blocks, key=key, mesh=mesh,
                                      strategy=strategy)
    blocks = task.blocks(state.model) if callable(task.blocks) else dict(task.blocks)
    bcd.check_blocks(state.model, blocks)
    missing = sorted({b for p in task.plan for b in p.blocks} - set(blocks))
    if missing:
        raise ValueError(f"the plan trains block(s) {missing}, which the model does not have; "
                         f"its blocks are {sorted(blocks)}.")
    if train_step is None:
        train_step = TrainStep(task.loss_fn, optimizers, blocks, mesh=mesh,
                               state_shardings=shardings, options=options or StepOptions())
    data = resident = None
    if with_data and _use_device_data(device_data, task.train, mesh, train_step):
        data = resident = DeviceData(task.train, mesh, global_batch_size=batch_size, seed=seed,
                                     shuffle=shuffle)
    elif with_data:
        ds = make_dataset(task.train, global_batch_size=batch_size, seed=seed, shuffle=shuffle,
                          mesh=mesh)
        data = DevicePrefetcher(iter(ds), mesh, size=prefetch)
    step_fn = PhaseStep(train_step, task.plan, clock, shardings.model, mesh, task.batch_extras,
                        **({} if ensemble is None else {"enter": enter_members}),
                        device_data=resident, steps_per_call=steps_per_call)
    engine = Engine(task=task, mesh=mesh, clock=clock, state=state, shardings=shardings,
                    optimizers=optimizers, blocks=blocks, train_step=train_step,
                    step_fn=step_fn, data=data, evaluator=None, ensemble=ensemble)
    if task.val is not None:
        engine.evaluator = engine.evaluator_for(task.val, batch_size=eval_batch_size)
    return engine


def _use_device_data(mode: str, arrays: Mapping[str, Any], mesh: Mesh, step: Any) -> bool:
    if mode not in DEVICE_DATA:
        raise ValueError(f"device_data={mode!r} is not valid; choose one of {DEVICE_DATA}.")
    if mode == "off":
        log.info("input: the Grain host pipeline (device_data='off')")
        return False
    if not isinstance(step, TrainStep):  # (a step that MultiStep cannot loop over)
        if mode == "on":
            raise ValueError(f"device_data='on' needs a TrainStep, not {type(step).__name__}.")
        return False
    ok, size = fits(arrays, mesh)
    if mode == "auto" and jax.process_count() > 1:  # every process must take the same path
        ok = bool(np.all(multihost_utils.process_allgather(np.array([ok]))))
    if mode == "auto" and not ok:
        log.info("input: the Grain host pipeline (the data would take %s)", size)
        return False
    log.info("input: on the devices (%s), many steps per dispatch", size)
    return True
