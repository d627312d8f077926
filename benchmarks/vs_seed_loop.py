"""The same training written the seed-000 way vs this system's loop, side by side in one run.

Both train the same model (the CLI's task: the PSF field model by default) on the same data with
the same per-block optimizers, batch size, BCD phases and number of steps:

- **seed**: WaveDiff-JAX's loop (`shared/seeds/000_*`): ``make_step`` under ``eqx.filter_jit``
  per batch, host-side numpy shuffle and batching (each batch copied to the default device by
  the call), the loss read back to the host every step (``float(loss)``) for the epoch mean;
  one optimizer state per phase (``optax.partition`` of the two block optimizers in the
  complete phase). It runs on one device, as the seed does.
- **system**: what ``python -m distributed.train`` runs: `run_loop` + the sharded, donated
  `TrainStep` + the Grain pipeline with `DevicePrefetcher`, on a mesh over all devices
  (``data:-1``), metrics read only at log points.
- **system_1dev** (diagnostic): the system on a one-device mesh, to separate the loop's own
  gain from the gain of using more devices.

Validation, checkpoints and the final report are left out of both (neither is training). Each
variant first runs one epoch per phase (compiles excluded from timing); then repetitions are
interleaved. Reported: samples/s (median) and the ratio system/seed (target >= 2x).

    python benchmarks/vs_seed_loop.py [--quick] [--devices=8] [--model=psf]
"""

from __future__ import annotations

import dataclasses
import time

import common


@dataclasses.dataclass
class Config:
    model: str = "psf"  # a task of distributed.tasks (the CLI's --model)
    batch_size: int = 64  # the CLI default
    n_train: int = 512  # the CLI default: 8 steps per epoch
    epochs_per_phase: int = 3  # psf: param, nonparam, complete phases (mlp: 3x this epochs)
    reps: int = 3
    single_device: bool = True  # also time the system on a one-device mesh
    target: float = 2.0
    quick: bool = False
    devices: int = 0


QUICK = dict(model="mlp", epochs_per_phase=1, reps=1, n_train=128, single_device=False)


def train_config(cfg: Config, epochs_per_phase: int):
    from distributed.config import TrainConfig

    e = epochs_per_phase
    return TrainConfig(model=cfg.model, batch_size=cfg.batch_size, n_train=cfg.n_train,
                       n_val=8, n_test=8, epochs_param=e, epochs_nonparam=e,
                       epochs_complete=e, epochs=3 * e, progress="none")


# ---------------------------------------------------------------------- the seed-000 way
class SeedLoop:
    """WaveDiff-JAX's training, as its documentation writes it."""

    def __init__(self, task):
        import equinox as eqx
        import jax

        self.task = task
        self.keys = tuple(task.train)
        self.data = tuple(task.train[k] for k in self.keys)  # host numpy arrays
        # One loss function object, so that filter_jit's cache hits across runs.
        keys = self.keys
        self.loss_fn = lambda model, batch: task.loss_fn(
            model, dict(zip(keys, batch, strict=True)))[0]
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
                opt = self.task.optimizers[phase_blocks[0]]
            else:  # one optimizer over both blocks, each block with its own transformation
                def label(*flags):
                    return next(b for b, f in zip(phase_blocks, flags, strict=True) if f) \
                        if any(flags) else phase_blocks[0]

                labels = eqx.filter(jax.tree.map(label, *(blocks[b] for b in phase_blocks)), spec)
                # (a callable: the labels tree is a Module, which optax would call)
                opt = optax.partition({b: self.task.optimizers[b] for b in phase_blocks},
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

        from distributed.bcd import union

        model = self.task.model_fn()
        blocks = self.task.blocks_fn(model)
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
def system_train(system) -> tuple[int, float, float]:
    import jax

    from distributed.loop import run_loop

    data = common.system_data(system)
    t = time.perf_counter()  # the pipeline is built before the clock starts, as in the CLI
    state, result = run_loop(system.state, common.phase_step_fn(system), data_iterator=data,
                             num_epochs=common.total_epochs(system), num_batches=system.spe,
                             show_progress=False, log_every=system.cfg.log_every)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t
    data.close()
    return result.final_step, result.history["train_loss"][-1], elapsed


def run(cfg: Config) -> dict:
    import jax

    from distributed.mesh import make_mesh

    tcfg, warm_cfg = train_config(cfg, cfg.epochs_per_phase), train_config(cfg, 1)
    seed = SeedLoop(common.build_system(tcfg).task)
    meshes = {"system": make_mesh(tcfg.mesh)}
    if cfg.single_device and jax.device_count() > 1:
        meshes["system_1dev"] = make_mesh("data:1", devices=jax.devices()[:1])
    steps_fns, last = {}, {}
    for name, mesh in meshes.items():
        warm = common.build_system(warm_cfg, mesh=mesh)
        system_train(warm)  # compiles every phase's step (the cache lives in the TrainStep)

        def fn(mesh=mesh, step=warm.step, name=name):
            system = common.build_system(tcfg, mesh=mesh, step=step)
            steps, loss, elapsed = system_train(system)
            last[name] = (steps, loss)
            return elapsed

        steps_fns[name] = fn
    seed.train(common.build_system(warm_cfg).task.plan, cfg.batch_size, tcfg.seed)  # compile

    def seed_fn():
        t = time.perf_counter()
        last["seed"] = seed.train(common.build_system(tcfg).task.plan, cfg.batch_size, tcfg.seed)
        return time.perf_counter() - t

    times = {"seed": [], **{n: [] for n in steps_fns}}
    fns = {"seed": seed_fn, **steps_fns}
    for r in range(cfg.reps):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for n in order:
            times[n].append(fns[n]())
    out: dict = {"model": cfg.model, "batch_size": cfg.batch_size}
    for n, ts in times.items():
        steps, loss = last[n]
        sps = [steps * cfg.batch_size / t for t in ts]
        out[n] = {"steps": steps, "wall_s": common.summarize(ts, 4),
                  "samples_per_s": common.summarize(sps, 1), "final_train_loss": loss}
        if n != "seed":
            out[n]["mesh"] = dict(meshes[n].shape)
    med = lambda n: out[n]["samples_per_s"]["median"]  # noqa: E731
    out["ratio"] = round(med("system") / med("seed"), 3)
    if "system_1dev" in out:
        out["ratio_1dev"] = round(med("system_1dev") / med("seed"), 3)
    out["target"] = cfg.target
    out["meets_target"] = bool(out["ratio"] >= cfg.target)
    return out


if __name__ == "__main__":
    common.main("vs_seed_loop", Config, QUICK, run)
