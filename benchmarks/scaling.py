"""Memory scaling of FSDP, and compile counts across BCD phase switches.

1. **Bytes per device** of parameters + optimizer state (the `TrainState`'s ``model`` and
   ``opt_state``, measured with `distributed.core.sharding.addressable_bytes` on the first
   device) under ``--sharding=replicate`` vs ``--sharding=fsdp`` on an ``fsdp:N`` mesh for
   N = 1..8 devices, each state built by the engine assembly (`distributed.engine.build`; for
   PSF the CLI's ``make_task`` + ``build_engine``): an MLP whose widths divide by every N
   (840 = lcm(1..8)), and the default PSF model (whose 32x32 maps split only over N in
   {1, 2, 4, 8}). Target: FSDP <= (1/N + 5%) of replicated.
2. **Compiles per step kind**: the default PSF job's engine (``make_task`` + ``build_engine``,
   one epoch per phase) whose phase-following step (`PhaseStep`, with the first-run rule) is
   driven through two full ``complete`` BCD cycles (param -> nonparam -> complete -> param
   -> ...) by the host step counter, counting traces per step kind
   (``engine.train_step.trace_counts``) and XLA compilations after each kind's first step.
   Target: exactly one trace per kind, no compilation afterwards.

    python benchmarks/scaling.py [--quick] [--devices=8]
"""

from __future__ import annotations

import dataclasses

import common


@dataclasses.dataclass
class Config:
    device_counts: str = "1,2,3,4,5,6,7,8"  # counts above the available devices are skipped
    mlp_width: int = 840  # divisible by 1..8
    mlp_depth: int = 2
    cycles: int = 2  # BCD cycles driven through the step
    steps_per_phase: int = 3
    overhead_target: float = 0.05  # FSDP <= (1/N + this) x replicated
    quick: bool = False
    devices: int = 0


QUICK = dict(device_counts="1,2,4,8", mlp_width=168, cycles=2, steps_per_phase=1)


def per_device_bytes(cfg: Config) -> list[dict]:
    import dataclasses as dc

    import jax

    from distributed.cli.config import TrainConfig
    from distributed.cli.run import build_engine
    from distributed.cli.tasks import make_task
    from distributed.core.mesh import make_mesh
    from distributed.core.sharding import addressable_bytes
    from distributed.engine import build

    psf_cfg = TrainConfig(n_train=64, n_val=8, n_test=8)
    psf = make_task(psf_cfg)
    mlp = common.mlp_task(cfg.mlp_width, cfg.mlp_depth)

    def state(name, mesh, strategy, batch):
        if name == "psf":  # the CLI's engine, with --sharding=strategy
            engine = build_engine(dc.replace(psf_cfg, sharding=strategy, batch_size=batch),
                                  psf, mesh)
            engine.data.close()
        else:
            engine = build(mlp, mesh=mesh, batch_size=batch, seed=0, key=jax.random.key(0),
                           strategy=strategy, with_data=False)
        return engine.state

    rows = []
    for n in (int(x) for x in cfg.device_counts.split(",")):
        if n > jax.device_count():
            continue
        mesh = make_mesh(f"fsdp:{n}", devices=jax.devices()[:n])
        batch = n * (64 // n)  # the batch must split over the n shards (it sizes no state)
        for name in ("mlp", "psf"):
            got = {}
            for strategy in ("replicate", "fsdp"):
                st = state(name, mesh, strategy, batch)
                got[strategy] = addressable_bytes((st.model, st.opt_state))
                del st
            frac = got["fsdp"] / got["replicate"]
            rows.append({"model": name, "devices": n, "replicate_bytes": got["replicate"],
                         "fsdp_bytes": got["fsdp"], "fsdp_fraction": round(frac, 4),
                         "ideal_fraction": round(1 / n, 4),
                         "meets_target": bool(frac <= 1 / n + cfg.overhead_target)})
    return rows


def compile_counts(cfg: Config) -> dict:
    import jax

    from distributed.cli.config import TrainConfig
    from distributed.core.bcd import phase_boundaries

    # One "epoch" (one step: 64 examples, batch 64) per phase.
    engine = common.make_engine(TrainConfig(n_train=64, n_val=8, n_test=8, batch_size=64,
                                            epochs_param=1, epochs_nonparam=1,
                                            epochs_complete=1))
    plan, step_fn = engine.plan, engine.step_fn
    bounds = phase_boundaries(plan, engine.clock)
    batch = next(engine.data)
    engine.data.close()
    counter = common.CompileCounter()
    state, events = engine.state, []
    try:
        for cycle in range(cfg.cycles):
            for i, phase in enumerate(plan):
                kind = "+".join(phase.blocks)
                for j in range(cfg.steps_per_phase):
                    before = counter.count
                    # the host step counter drives the phase, as in the CLI: plan phase i
                    host_step = bounds[i] + min(j, bounds[i + 1] - bounds[i] - 1)
                    state, metrics = step_fn(state, batch, None, step=host_step)
                    jax.block_until_ready(metrics["loss"])
                    events.append({"cycle": cycle, "phase": kind, "step_in_phase": j,
                                   "compiles": counter.count - before})
    finally:
        counter.close()
    first = {}
    for e in events:
        first.setdefault((e["cycle"], e["phase"]), e["compiles"])
    later = sum(e["compiles"] for e in events if e["step_in_phase"] > 0)
    revisit = sum(e["compiles"] for e in events if e["cycle"] > 0)
    traces = {"+".join(k): v for k, v in engine.train_step.trace_counts.items()}
    kinds = sorted({"+".join(p.blocks) for p in plan})
    ok = all(traces.get(k) == 1 for k in kinds) and len(traces) == len(kinds) and \
        later == 0 and revisit == 0
    return {"plan": [p.name for p in plan], "cycles": cfg.cycles,
            "trace_counts": traces,
            "compiles_on_first_step_of_phase": {f"{c}:{k}": v for (c, k), v in first.items()},
            "compiles_after_first_step": later, "compiles_in_later_cycles": revisit,
            "meets_target": bool(ok)}


def run(cfg: Config) -> dict:
    rows = per_device_bytes(cfg)
    counts = compile_counts(cfg)
    return {"memory": rows, "memory_meets_target": all(r["meets_target"] for r in rows
                                                       if r["model"] == "mlp"),
            "compiles": counts, "overhead_target": cfg.overhead_target,
            "meets_target": bool(counts["meets_target"] and all(
                r["meets_target"] for r in rows if r["model"] == "mlp"))}


if __name__ == "__main__":
    common.main("scaling", Config, QUICK, run)
