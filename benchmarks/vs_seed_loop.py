"""The same training written the seed-000 way vs this system's loop, side by side in one run.

Both train the same model (the CLI's task: the PSF field model by default) on the same data with
the same per-block optimizers, batch size, BCD phases and number of steps:

- **seed**: WaveDiff-JAX's loop (`shared/seeds/000_*`): ``make_step`` under ``eqx.filter_jit``
  per batch, host-side numpy shuffle and batching (each batch copied to the default device by
  the call), the loss read back to the host every step (``float(loss)``) for the epoch mean;
  one optimizer state per phase (``optax.partition`` of the two block optimizers in the
  complete phase). It runs on one device, as the seed does.
- **system**: what ``python -m distributed.train`` runs, built by the CLI's own assembly
  (``make_task`` + ``build_engine``): `run_loop` over the engine's phase-following step
  (`PhaseStep` -> the sharded, donated `TrainStep`) and its Grain pipeline with
  `DevicePrefetcher`, on the CLI's default mesh over all devices (``data:-1``), metrics read
  only at log points.
- **system_1dev** (diagnostic): the system on a one-device mesh, to separate the loop's own
  gain from the gain of using more devices.

Validation, checkpoints and the final report are left out of both (neither is training). Each
variant first runs untimed (the system: the whole training once, on an engine whose compiled
`TrainStep` every timed engine then reuses; the seed: one epoch per phase), so compiles are
excluded from timing; then repetitions are interleaved, each system repetition on a fresh engine
(new state and input pipeline, built before its clock starts). Reported: samples/s (median) and
the ratio system/seed (target >= 2x).

    python benchmarks/vs_seed_loop.py [--quick] [--devices=8] [--model=psf]
"""

from __future__ import annotations

import dataclasses
import time

import common


@dataclasses.dataclass
class Config:
    model: str = "psf"  # a task of distributed.cli.tasks (the CLI's --model)
    batch_size: int = 64  # the CLI default
    n_train: int = 512  # the CLI default: 8 steps per epoch
    epochs_per_phase: int = 3  # psf: param, nonparam, complete phases (mlp: 3x this epochs)
    reps: int = 3
    single_device: bool = True  # also time the system on a one-device mesh
    target: float = 2.0
    quick: bool = False
    devices: int = 0


QUICK = dict(model="mlp", epochs_per_phase=1, reps=1, n_train=128, single_device=False)


def train_config(cfg: Config):
    from distributed.cli.config import TrainConfig

    e = cfg.epochs_per_phase
    return TrainConfig(model=cfg.model, batch_size=cfg.batch_size, n_train=cfg.n_train,
                       n_val=8, n_test=8, epochs_param=e, epochs_nonparam=e,
                       epochs_complete=e, epochs=3 * e, progress="none")


# ---------------------------------------------------------------------- the seed-000 way
class SeedLoop:
    """WaveDiff-JAX's training, as its documentation writes it, of an engine `Task` with the
    system's (resolved) per-block optimizers."""

    def __init__(self, task, optimizers):
        import equinox as eqx
        import jax

        self.task, self.block_optimizers = task, dict(optimizers)
        self.keys = tuple(task.train)
        self.data = tuple(task.train[k] for k in self.keys)  # host numpy arrays
        # One loss function object, so that filter_jit's cache hits across runs; the task's loss
        # (a Ratio and an aux dict) as the plain scalar the seed differentiates.
        keys, loss = self.keys, common.scalar_loss(task.loss_fn)
        self.loss_fn = lambda model, batch: loss(model, dict(zip(keys, batch, strict=True)))
        self.optimizers: dict = {}

        @eqx.filter_jit
        def make_step(model, opt_state, optimizer, batch, loss_fn, filter_spec):
            diff, static = eqx.partition(model, filter_spec)
            loss, grads = jax.value_and_grad(lambda d: loss_fn(eqx.combine(d, static), batch))(
                diff)
            updates, opt_state = optimizer.update(grads, opt_state, diff)
            return eqx.apply_updates(model, updates), opt_state, loss

        self.make_step = make_step

    def _optimizer(self, blocks, phase_blocks, spec):
        import equinox as eqx
        import jax
        import optax

        if phase_blocks not in self.optimizers:
            if len(phase_blocks) == 1:
                opt = self.block_optimizers[phase_blocks[0]]
            else:  # one optimizer over both blocks, each block with its own transformation
                def label(*flags):
                    return next(b for b, f in zip(phase_blocks, flags, strict=True) if f) \
                        if any(flags) else phase_blocks[0]

                labels = eqx.filter(jax.tree.map(label, *(blocks[b] for b in phase_blocks)), spec)
                # (a callable: the labels tree is a Module, which optax would call)
                opt = optax.partition({b: self.block_optimizers[b] for b in phase_blocks},
                                      lambda params: labels)
            self.optimizers[phase_blocks] = opt
        return self.optimizers[phase_blocks]

    def train_epoch(self, model, opt_state, optimizer, batch_size, filter_spec, key):
        import jax
        import numpy as np

        n = self.data[0].shape[0]
        perm = np.asarray(jax.random.permutation(key, n))
        losses = []
        for i in range(n // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            batch = tuple(d[idx] for d in self.data)  # host batch; copied by the jitted call
            model, opt_state, loss = self.make_step(model, opt_state, optimizer, batch,
                                                    self.loss_fn, filter_spec)
            losses.append(float(loss))  # read back every step, as the seed does
        return model, opt_state, float(np.mean(losses))

    def train(self, plan, batch_size: int, seed: int) -> tuple[int, float]:
        import equinox as eqx
        import jax

        from distributed.core.bcd import union

        model = self.task.model()
        blocks = self.task.blocks(model) if callable(self.task.blocks) else self.task.blocks
        steps, loss, epoch = 0, float("nan"), 0
        for phase in plan:
            spec = union(*(blocks[b] for b in phase.blocks))
            optimizer = self._optimizer(blocks, phase.blocks, spec)
            if phase.zero_alpha_on_enter:
                model = model.set_alpha_zero()
            opt_state = optimizer.init(eqx.filter(model, spec))
            for _ in range(phase.epochs):
                model, opt_state, loss = self.train_epoch(
                    model, opt_state, optimizer, batch_size, spec,
                    jax.random.PRNGKey(seed + epoch))
                steps += self.data[0].shape[0] // batch_size
                epoch += 1
            if phase.identity_alpha_on_exit:
                model = model.set_alpha_identity()
        jax.block_until_ready(model)
        return steps, loss


# ---------------------------------------------------------------------- the system's loop
def system_train(engine, log_every: int, compiles: dict | None = None
                 ) -> tuple[int, float, float]:
    """One CLI training run of a fresh engine (its pipeline built before the clock starts, as
    in the CLI): steps, final train loss, seconds. ``compiles``: ``{"counter": CompileCounter,
    "timed": n}``, to which the XLA compilations of the timed region are added."""
    before = compiles["counter"].count if compiles else 0
    t = time.perf_counter()
    _, result = common.run_engine(engine, log_every=log_every)
    elapsed = time.perf_counter() - t
    if compiles:
        compiles["timed"] += compiles["counter"].count - before
    engine.data.close()
    return result.final_step, result.history["train_loss"][-1], elapsed


def run(cfg: Config) -> dict:
    import dataclasses as dc

    import jax

    from distributed.core.mesh import make_mesh

    tcfg = train_config(cfg)
    makers = {"system": common.Engines(tcfg)}
    if cfg.single_device and jax.device_count() > 1:
        makers["system_1dev"] = common.Engines(tcfg, mesh=make_mesh("data:1",
                                                                    devices=jax.devices()[:1]))
    steps_fns, last, optimizers = {}, {}, None
    compiles = {"counter": common.CompileCounter(), "timed": 0}  # warm-up must compile all
    for name, maker in makers.items():
        warm = maker.new()
        optimizers = optimizers or warm.optimizers
        system_train(warm, tcfg.log_every)  # compiles every phase's step (in its TrainStep)

        def fn(maker=maker, name=name):
            steps, loss, elapsed = system_train(maker.new(), tcfg.log_every, compiles)
            last[name] = (steps, loss)
            return elapsed

        steps_fns[name] = fn
    task = makers["system"].run_task.task
    seed = SeedLoop(task, optimizers)
    seed.train(tuple(dc.replace(p, epochs=1) for p in task.plan), cfg.batch_size,
               tcfg.seed)  # compiles every phase's step

    def seed_fn():
        before = compiles["counter"].count
        t = time.perf_counter()
        last["seed"] = seed.train(task.plan, cfg.batch_size, tcfg.seed)
        elapsed = time.perf_counter() - t
        compiles["timed"] += compiles["counter"].count - before
        return elapsed

    times = {"seed": [], **{n: [] for n in steps_fns}}
    fns = {"seed": seed_fn, **steps_fns}
    try:
        for r in range(cfg.reps):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for n in order:
                times[n].append(fns[n]())
    finally:
        compiles["counter"].close()
    out: dict = {"model": cfg.model, "batch_size": cfg.batch_size}
    for n, ts in times.items():
        steps, loss = last[n]
        sps = [steps * cfg.batch_size / t for t in ts]
        out[n] = {"steps": steps, "wall_s": common.summarize(ts, 4),
                  "samples_per_s": common.summarize(sps, 1), "final_train_loss": loss}
        if n != "seed":
            out[n]["mesh"] = dict(makers[n].mesh.shape)
    med = lambda n: out[n]["samples_per_s"]["median"]  # noqa: E731
    out["ratio"] = round(med("system") / med("seed"), 3)
    if "system_1dev" in out:
        out["ratio_1dev"] = round(med("system_1dev") / med("seed"), 3)
    out["compiles_during_timing"] = compiles["timed"]
    out["target"] = cfg.target
    out["meets_target"] = bool(out["ratio"] >= cfg.target)
    return out


if __name__ == "__main__":
    common.main("vs_seed_loop", Config, QUICK, run)
