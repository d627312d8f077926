"""Input pipeline throughput, and where the training wall time goes.

1. **Pipeline alone**: the CLI's Grain dataset of the embedded star field (the task of
   ``make_task``; shuffled, batched, sliced per process, made as the engine makes it) iterated
   with no training: host batches/s and samples/s, shuffled and in order (the shuffled cost
   per example over the unshuffled: target <= 1.5); then the same through `DevicePrefetcher`
   (host batch -> global sharded `jax.Array`, the engine's ``data``), blocking on the last; and
   `to_global` alone on one host batch (the host -> device share of the cost).
2. **The wall time in training**: the default command-line job (``distributed.cli.run.run``
   with the default `TrainConfig`, fewer epochs), once per ``--device_data`` (``on``: arrays on
   the devices, many steps per dispatch; ``off``: the Grain host pipeline). From the goodput
   ledger in its summary.json: ``data_wait_s / wall_s`` (target <= 1%, also against the wall
   less compilation), the share of the wall the ledger explains, ``1 - other_s / wall_s``
   (target >= 95%), and the step share of the wall less compilation (target >= 80%).

    python benchmarks/data.py [--quick] [--devices=8]
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import common


@dataclasses.dataclass
class Config:
    batch_size: int = 64  # the CLI default
    n_train: int = 512  # the CLI default
    batches: int = 500  # batches per pipeline-throughput repetition
    reps: int = 3
    prefetch: int = 2  # DevicePrefetcher size (the CLI's)
    train_model: str = "psf"  # the CLI's --model for the data-wait runs (psf: the default job)
    train_epochs_per_phase: int = 4  # of the CLI job (default 12: same per-step behaviour)
    train_runs: int = 2
    target: float = 0.01
    target_shuffle_cost: float = 1.5
    target_explained: float = 0.95
    target_step_share: float = 0.80
    quick: bool = False
    devices: int = 0


QUICK = dict(batches=50, reps=1, n_train=128, train_model="mlp", train_epochs_per_phase=1,
             train_runs=1)


def pipeline_throughput(cfg: Config) -> dict:
    import jax

    from distributed.cli.config import TrainConfig
    from distributed.cli.tasks import make_task
    from distributed.core.mesh import make_mesh
    from distributed.data import DevicePrefetcher, make_dataset, to_global

    tcfg = TrainConfig(n_train=cfg.n_train, n_val=8, n_test=8, batch_size=cfg.batch_size)
    task = make_task(tcfg).task
    mesh = make_mesh(tcfg.mesh)
    bytes_per_batch = sum(v[0].nbytes for v in task.train.values()) * cfg.batch_size

    def dataset(shuffle=True):  # as `distributed.engine.build` makes the host input
        return make_dataset(task.train, global_batch_size=cfg.batch_size, seed=tcfg.seed,
                            mesh=mesh, shuffle=shuffle)

    def host_only(shuffle=True):
        it = iter(dataset(shuffle))
        next(it)  # start-up (threads, first read) is not throughput
        t = time.perf_counter()
        for _ in range(cfg.batches):
            next(it)
        return time.perf_counter() - t

    def to_device():
        it = DevicePrefetcher(iter(dataset()), mesh, size=cfg.prefetch)
        next(it)
        t = time.perf_counter()
        batch = None
        for _ in range(cfg.batches):
            batch = next(it)
        jax.block_until_ready(batch)
        elapsed = time.perf_counter() - t
        it.close()
        return elapsed

    host_batch = next(iter(dataset()))

    def transfer_only():  # to_global alone: host batch -> sharded global arrays
        t = time.perf_counter()
        batch = None
        for _ in range(cfg.batches):
            batch = to_global(host_batch, mesh)
        jax.block_until_ready(batch)
        return time.perf_counter() - t

    times = common.interleaved({"host": host_only, "host_unshuffled": lambda: host_only(False),
                                "device": to_device, "transfer_only": transfer_only}, cfg.reps)
    out = {"batch_size": cfg.batch_size, "batch_mb": round(bytes_per_batch / 1e6, 4),
           "mesh": dict(mesh.shape)}
    for name, ts in times.items():
        bps = [cfg.batches / t for t in ts]
        out[name] = {"batches_per_s": common.summarize(bps, 1),
                     "samples_per_s": common.summarize([b * cfg.batch_size for b in bps], 1),
                     "mb_per_s": round(max(bps) * bytes_per_batch / 1e6, 1)}
    out["shuffled_cost_over_unshuffled"] = round(
        min(times["host"]) / min(times["host_unshuffled"]), 3)
    return out


def training_wait(cfg: Config) -> dict:
    from distributed.cli.config import TrainConfig
    from distributed.cli.run import run

    runs = []
    # a discarded warm-up run first (one-off process costs: the star field's generation,
    # runtime start-up), then the modes interleaved, in alternating order
    plan = [("off", -1)] + [(m, i) for i in range(cfg.train_runs)
                            for m in (("on", "off") if i % 2 == 0 else ("off", "on"))]
    for mode, i in plan:
        with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
            e = cfg.train_epochs_per_phase
            tcfg = TrainConfig(workdir=str(Path(tmp) / "run"), model=cfg.train_model,
                               epochs_param=e, epochs_nonparam=e, epochs_complete=e,
                               epochs=3 * e, n_train=cfg.n_train, seed=max(i, 0),
                               progress="none", device_data=mode)
            code = run(tcfg)
            if code != 0:
                raise RuntimeError(f"the CLI run exited with code {code}")
            summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        if i < 0:
            continue
        g = summary["goodput"]
        wall, wait, compiled = g["wall_s"], g["data_wait_s"], g["compile_s"]
        runs.append({"device_data": mode, "steps": summary["final_step"], "wall_s": wall,
                     **{k: g[k] for k in g if k.endswith("_s") and k != "wall_s"},
                     "goodput": g["goodput"],
                     "data_wait_fraction": round(wait / wall, 5),
                     "data_wait_fraction_excl_compile": round(wait / (wall - compiled), 5),
                     "explained": round(1 - g["other_s"] / wall, 4),
                     "step_share_excl_compile": round(g["step_s"] / (wall - compiled), 4),
                     "samples_per_sec": summary["samples_per_sec"]})
    by = {m: [r for r in runs if r["device_data"] == m] for m in ("on", "off")}
    worst = {m: {"data_wait_fraction_excl_compile": max(
                     r["data_wait_fraction_excl_compile"] for r in rs),
                 "explained": min(r["explained"] for r in rs),
                 "step_share_excl_compile": min(r["step_share_excl_compile"] for r in rs)}
             for m, rs in by.items()}
    return {"job": f"the CLI's defaults with --model={cfg.train_model}, "
                   f"{cfg.train_epochs_per_phase} epochs per phase (x3 for mlp)",
            "runs": runs, "worst": worst,
            "data_wait_fraction": max(r["data_wait_fraction"] for r in by["on"]),
            "data_wait_fraction_excl_compile": worst["on"]["data_wait_fraction_excl_compile"]}


def run_benchmark(cfg: Config) -> dict:
    pipe = pipeline_throughput(cfg)
    train = training_wait(cfg)
    on = train["worst"]["on"]  # the default job's input (auto picks it: the data fit)
    return {"pipeline": pipe, "training": train, "target": cfg.target,
            "meets_target": bool(
                on["data_wait_fraction_excl_compile"] <= cfg.target
                and pipe["shuffled_cost_over_unshuffled"] <= cfg.target_shuffle_cost
                and on["explained"] >= cfg.target_explained
                and on["step_share_excl_compile"] >= cfg.target_step_share)}


if __name__ == "__main__":
    common.main("data", Config, QUICK, run_benchmark)
