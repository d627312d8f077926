"""The system's sharded `TrainStep` vs a hand-written `jax.jit` step, side by side in one run.

Both steps train the same model from the same initial state on the same device-resident batch,
with the same per-block optimizers, mesh, parameter/optimizer shardings, batch sharding and
buffer donation. The system step is the `TrainStep` of the command line's own assembly
(``make_task`` + ``build_engine``: the CLI's `StepOptions`, non-finite guard on, metrics
returned as device scalars), called as the CLI's phase-following step calls it,
``train_step(state, batch, active_blocks)``; the baseline is the ~15 lines a JAX user would
write: ``jax.jit(step, in_shardings=..., out_shardings=..., donate_argnums=(0, 1))`` returning
``(params, opt_state, loss)``, differentiating the task's loss as a plain scalar.

Repetitions are interleaved (system, baseline, baseline, system, ...), each repetition times
``steps_per_rep`` back-to-back steps ending with ``block_until_ready``; warm-up (compilation)
is excluded; at most ``in_flight`` steps are queued. Reported: per-step time median/spread
for both, the ratio of the medians and the median of per-repetition paired ratios (target:
<= 1.03), a check that both produced the same parameters, and (``decompose``) the time of
`TrainStep`'s compiled function called without its Python wrapper, which splits the overhead
into in-graph extras and wrapper cost; ``system_minimal`` is the same `TrainStep` with
``StepOptions(metrics="minimal")`` (no ``update_norm`` reduction), through its wrapper.

    python benchmarks/step_overhead.py [--quick] [--devices=8] [--models=psf,mlp]
"""

from __future__ import annotations

import collections
import dataclasses

import common


@dataclasses.dataclass
class Config:
    models: str = "psf,mlp"  # tasks of distributed.cli.tasks (the CLI's --model)
    meshes: str = "dp,fsdp"  # dp = data:-1 (params replicated), fsdp = fsdp:-1 (sharded)
    batch_size: int = 64  # global batch (the CLI default)
    steps_per_rep: int = 10
    reps: int = 15
    warmup: int = 5  # steps per variant before timing (includes the compile)
    in_flight: int = 2  # steps queued before waiting for the oldest one's loss
    decompose: bool = True  # also time TrainStep's compiled function without its wrapper
    target: float = 1.03
    quick: bool = False
    devices: int = 0


QUICK = dict(models="mlp", steps_per_rep=3, reps=2, warmup=2)
MESHES = {"dp": "data:-1", "fsdp": "fsdp:-1"}


def baseline_step(loss_fn, optimizers, blocks, active, shardings, mesh):
    """The hand-written jitted step over (model arrays, optimizer states)."""
    import equinox as eqx
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from distributed.core.bcd import union
    from distributed.core.sharding import batch_sharding

    loss_fn = common.scalar_loss(loss_fn)
    mask = union(*(blocks[b] for b in active))
    is_sh = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    model_sh = eqx.filter(shardings.model, is_sh)
    opt_sh = eqx.filter(shardings.opt_state, is_sh)

    def make(static):
        def step(params, opt_state, batch):
            model = eqx.combine(params, static)
            diff, frozen = eqx.partition(model, mask)
            loss, grads = jax.value_and_grad(
                lambda d: loss_fn(eqx.combine(d, frozen), batch))(diff)
            opt_state = dict(opt_state)
            for b in active:
                updates, opt_state[b] = optimizers[b].update(
                    eqx.filter(grads, blocks[b]), opt_state[b], eqx.filter(model, blocks[b]))
                model = eqx.apply_updates(model, updates)
            return eqx.filter(model, eqx.is_array), opt_state, loss

        return jax.jit(step, in_shardings=(model_sh, opt_sh, batch_sharding(mesh)),
                       out_shardings=(model_sh, opt_sh, NamedSharding(mesh, P())),
                       donate_argnums=(0, 1))

    return make


def one_case(cfg: Config, model: str, mesh_name: str) -> dict:
    import equinox as eqx
    import jax
    import numpy as np

    from distributed.cli.config import TrainConfig
    from distributed.cli.tasks import make_task
    from distributed.core.mesh import make_mesh
    from distributed.core.step import TrainStep

    tcfg = TrainConfig(model=model, mesh=MESHES[mesh_name], batch_size=cfg.batch_size,
                       n_train=cfg.batch_size, n_val=8, n_test=8)
    run_task, mesh = make_task(tcfg), make_mesh(tcfg.mesh)
    # Three engines of the same run: the same initial state three times (the system's, the
    # baseline's and the compiled-function variant's). Only the first one's step is used.
    system, ref, comp, lean_e = (common.make_engine(tcfg, mesh, run_task) for _ in range(4))
    step, blocks = system.train_step, system.blocks
    active = tuple(blocks)  # all blocks: the complete phase (psf) / plain training (mlp)
    batch = next(system.data)  # one global batch of the CLI's pipeline (n_train = batch_size)
    for e in (system, ref, comp, lean_e):
        e.data.close()
    # The same step with StepOptions(metrics="minimal") (no update_norm), through its wrapper.
    lean = TrainStep(step.loss_fn, step.optimizers, step.blocks, mesh=mesh,
                     state_shardings=system.shardings,
                     options=dataclasses.replace(step.options, metrics="minimal"))

    sys_state = system.state
    model_static = eqx.filter(ref.state.model, lambda x: not eqx.is_array(x))
    base_params = eqx.filter(ref.state.model, eqx.is_array)
    base_opt = eqx.filter(ref.state.opt_state, eqx.is_array)
    base_fn = baseline_step(system.task.loss_fn, system.optimizers, blocks, active,
                            system.shardings, mesh)(model_static)
    fn, static = step.compiled(sys_state, active)
    holder = {"sys": sys_state, "lean": lean_e.state, "base": (base_params, base_opt),
              "comp": eqx.filter(comp.state, eqx.is_array)}
    losses = {}

    def pace(q, loss):
        # Keep at most `in_flight` steps queued (nanodo style: wait for step k-1's loss after
        # dispatching step k). Unbounded queues of multi-device programs can deadlock
        # XLA:CPU's collectives with simulated devices; on a GPU this costs nothing.
        q.append(loss)
        if len(q) >= cfg.in_flight:
            q.popleft().block_until_ready()

    def run_sys(n, name="sys", train_step=step):
        state, metrics, q = holder[name], None, collections.deque()
        for _ in range(n):
            state, metrics = train_step(state, batch, active)
            pace(q, metrics["loss"])
        holder[name] = common.block(state)
        return metrics["loss"] if metrics else None

    def run_compiled(n):
        arrays, metrics, q = holder["comp"], None, collections.deque()
        for _ in range(n):
            arrays, metrics = fn(arrays, batch)
            pace(q, metrics["loss"])
        holder["comp"] = common.block(arrays)
        return metrics["loss"] if metrics else None

    def run_base(n):
        params, opt, loss = *holder["base"], None
        q = collections.deque()
        for _ in range(n):
            params, opt, loss = base_fn(params, opt, batch)
            pace(q, loss)
        holder["base"] = common.block((params, opt))
        return loss

    losses["system"] = float(run_sys(1))
    losses["baseline"] = float(run_base(1))
    run_sys(cfg.warmup - 1)
    run_sys(cfg.warmup, "lean", lean)
    run_compiled(cfg.warmup)
    run_base(cfg.warmup - 1)
    k = cfg.steps_per_rep
    variants = {"system": lambda: run_sys(k), "baseline": lambda: run_base(k),
                "system_minimal": lambda: run_sys(k, "lean", lean)}
    if cfg.decompose:
        variants["system_compiled"] = lambda: run_compiled(k)
    times = common.interleaved(variants, cfg.reps)
    per_step = {n: [t / k for t in ts] for n, ts in times.items()}
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                        eqx.filter(holder["sys"].model, eqx.is_array), holder["base"][0])
    stats = {n: common.summarize(v) for n, v in per_step.items()}
    paired = common.summarize(common.paired_ratios(per_step["system"], per_step["baseline"]), 4)
    ratio = stats["system"]["median"] / stats["baseline"]["median"]
    lean_ratio = stats["system_minimal"]["median"] / stats["baseline"]["median"]
    extra = {}
    if cfg.decompose:
        c = stats["system_compiled"]["median"]
        extra = {"system_compiled_step_s": stats["system_compiled"],
                 # in-graph extras (guards, norms, metrics) and the Python wrapper, separately
                 "ratio_compiled_vs_baseline": round(c / stats["baseline"]["median"], 4),
                 "wrapper_overhead_s": round(stats["system"]["median"] - c, 6)}
    return {
        "model": model, "mesh": dict(mesh.shape), "active_blocks": list(active),
        "system_step_s": stats["system"], "baseline_step_s": stats["baseline"], **extra,
        "ratio": round(ratio, 4), "paired_ratio": paired,
        "system_minimal_step_s": stats["system_minimal"],
        "ratio_minimal_metrics": round(lean_ratio, 4),
        "meets_target": bool(ratio <= cfg.target),
        "first_loss": losses, "params_max_abs_diff": max(jax.tree.leaves(diff)),
        "system_trace_counts": {"+".join(k): v for k, v in step.trace_counts.items()},
    }


def run(cfg: Config) -> dict:
    cases = [one_case(cfg, m, mesh) for m in cfg.models.split(",") for mesh in
             cfg.meshes.split(",")]
    worst = max(c["ratio"] for c in cases)
    return {"cases": cases, "worst_ratio": worst, "target": cfg.target,
            "meets_target": bool(worst <= cfg.target)}


if __name__ == "__main__":
    common.main("step_overhead", Config, QUICK, run)
