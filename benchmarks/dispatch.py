"""Many steps per dispatch: device-resident input against the host pipeline, side by side.

desisky's task (synthetic rows 6 -> 4, its MLP width 128 depth 5, MSE, Adam 1e-3) through
`distributed.build` + `run_loop` on a one-device mesh (the setting where per-step host costs
dominate), at batch 32 and 256: ``device_data="on"`` (arrays on the device, up to
``steps_per_call`` steps per `lax.fori_loop` call, chunks cut at the log points) against
``"off"`` (Grain host pipeline, `DevicePrefetcher`, one dispatch per step). Each variant trains
one warm-up epoch (compiles), then ``epochs`` timed epochs; variants interleaved. Reported:
steady-state samples/s, the ratio on / off, the achieved GFLOP/s (forward + backward ~ 3x the
forward's 2 x multiply-adds per example), the largest parameter difference after the warm-up
epoch (the two compiled programs round differently: ~1e-8; Adam then amplifies such
differences over many steps) and the final epoch-mean training losses of both.

    python benchmarks/dispatch.py [--quick] [--devices=8]
"""

from __future__ import annotations

import dataclasses
import time

import common


@dataclasses.dataclass
class Config:
    rows: int = 20_000
    batches: str = "32,256"
    epochs: int = 2
    width: int = 128
    depth: int = 5
    log_every: int = 25  # the CLI's default: chunks end at these steps
    reps: int = 3
    quick: bool = False
    devices: int = 0


QUICK = dict(rows=512, epochs=1, reps=1, width=16, depth=2)


def run_benchmark(cfg: Config) -> dict:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np

    import distributed as dx
    from distributed.core.bcd import single_phase_plan
    from distributed.core.tree import tree_copy

    rng = np.random.default_rng(0)
    x = rng.normal(size=(cfg.rows, 6)).astype(np.float32)
    y = np.tanh(x[:, :4] + 0.5 * x[:, 2:])
    mesh = dx.make_mesh("data:1", jax.devices()[:1])

    def loss(model, batch):
        return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)

    def engine(mode, batch):
        task = dx.Task(model=lambda: eqx.nn.MLP(6, 4, cfg.width, cfg.depth,
                                                key=jax.random.key(0)),
                       loss_fn=loss, train={"x": x, "y": y},
                       plan=single_phase_plan(cfg.epochs + 1),
                       optimizers={"all": dx.configure_optimizer(1e-3)})
        return dx.build(task, mesh=mesh, batch_size=batch, seed=1, key=jax.random.key(1),
                        device_data=mode)

    flops = 3 * 2 * (6 * cfg.width + (cfg.depth - 1) * cfg.width ** 2 + cfg.width * 4)
    cases = []
    for batch in (int(b) for b in cfg.batches.split(",")):
        engines, states, losses = {}, {}, {}
        for mode in ("on", "off"):  # the warm-up epoch: compilation, first batches
            e = engines[mode] = engine(mode, batch)
            states[mode], _ = dx.run_loop(e.state, e.step_fn, num_epochs=1, clock=e.clock,
                                          data_iterator=e.data, show_progress=False,
                                          log_every=cfg.log_every)
            common.block(states[mode])
        steps = engines["on"].clock.steps(cfg.epochs + 1) - engines["on"].clock.steps(1)
        times: dict[str, list[float]] = {"on": [], "off": []}
        for rep in range(cfg.reps):
            for mode in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                e = engines[mode]
                # the same timed epochs every repetition: from the warm-up's state and position
                e.data.set_state({"next_index": e.clock.steps(1)})
                start = tree_copy(states[mode])  # (the step donates its input)
                common.block(start)
                t = time.perf_counter()
                state, result = dx.run_loop(start, e.step_fn, num_epochs=cfg.epochs + 1,
                                            clock=e.clock, data_iterator=e.data,
                                            show_progress=False, log_every=cfg.log_every)
                common.block(state)
                times[mode].append(time.perf_counter() - t)
                losses[mode] = result.history["train_loss"][-1]
        rates = {m: [steps * batch / t for t in ts] for m, ts in times.items()}
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(eqx.filter(states["on"].model, eqx.is_array)),
                                   jax.tree.leaves(eqx.filter(states["off"].model,
                                                              eqx.is_array)), strict=True))
        on, off = max(rates["on"]), max(rates["off"])
        cases.append({"batch": batch, "steps_timed": steps,
                      "samples_per_s_on": common.summarize(rates["on"], 1),
                      "samples_per_s_off": common.summarize(rates["off"], 1),
                      "ratio": round(on / off, 3),
                      "paired_ratios": common.paired_ratios(times["off"], times["on"]),
                      "gflops_on": round(on * flops / 1e9, 2),
                      "params_max_abs_diff_after_one_epoch": diff,
                      "final_train_loss_on": losses["on"], "final_train_loss_off": losses["off"]})
    return {"cases": cases, "flops_per_example": flops,
            "same_parameters": all(c["params_max_abs_diff_after_one_epoch"] < 1e-5
                                   for c in cases)}


if __name__ == "__main__":
    common.main("dispatch", Config, QUICK, run_benchmark)
