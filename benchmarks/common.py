"""Shared pieces of the benchmarks: flags -> dataclass config, simulated devices, timing,
machine info, the training system built by the CLI's own assembly (``make_task`` +
``build_engine``), and the single JSON line each benchmark prints.

Every benchmark is one command, ``python benchmarks/X.py [--quick] [--devices=N] [--field=v]``:
``--devices=N`` simulates N CPU devices (it must take effect before jax starts, so `parse` runs
before anything imports jax), ``--quick`` shrinks the run to a smoke test, and every other
field of the benchmark's config dataclass is a ``--field=value`` flag. Results go to stdout as
exactly one JSON line; everything else (logs, warnings) goes to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/X.py` from a checkout, without installing
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------ config / flags
def _convert(text: str, default: Any, name: str) -> Any:
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", ""):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise SystemExit(f"error: --{name}={text!r} is not a boolean; use true or false.")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise SystemExit(
                    f"error: --{name}={text!r} is not a{'n int' if kind is int else ' float'}."
                ) from None
    return text


def parse(config_cls: type, quick: Mapping[str, Any] | None = None,
          argv: Sequence[str] | None = None) -> Any:
    """Build ``config_cls`` from ``--field=value`` flags; apply ``quick`` overrides for --quick.

    The config dataclass must have ``quick: bool`` and ``devices: int`` fields. When
    ``devices > 0`` the CPU platform simulates that many devices (set before jax initialises;
    on a GPU/TPU host it only affects the unused CPU backend).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(f"usage: {sys.argv[0]} " + " ".join(
                f"[--{n}={f.default!r}]" for n, f in fields.items()), file=sys.stderr)
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; every option is --field=value.")
        name, _, text = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            raise SystemExit(f"error: unknown flag --{name}; known: {sorted(fields)}.")
        values[name] = _convert(text, fields[name].default, name)
    if values.get("quick") and quick:
        values = {**quick, **values}  # explicit flags win over the quick preset
    cfg = config_cls(**values)
    if cfg.devices:
        from distributed.runtime import configure_host_devices

        configure_host_devices(cfg.devices)
    return cfg


# ------------------------------------------------------------------------------ output
@contextlib.contextmanager
def stdout_to_stderr():
    """Send anything printed during the benchmark to stderr, so stdout carries one JSON line."""
    real = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield real
    finally:
        sys.stdout = real


def machine_info() -> dict[str, Any]:
    import jax

    devs = jax.devices()
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "platform": jax.default_backend(),
        "device_kind": devs[0].device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def emit(name: str, cfg: Any, results: Mapping[str, Any], stream=None) -> dict[str, Any]:
    """Print ``{"benchmark", "config", "machine", **results}`` as one JSON line."""
    record = {"benchmark": name, "config": dataclasses.asdict(cfg), "machine": machine_info(),
              **results}
    line = json.dumps(record, default=_jsonable, allow_nan=False)
    print(line, file=stream or sys.stdout, flush=True)
    return record


def _jsonable(x: Any) -> Any:
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def main(name: str, config_cls: type, quick: Mapping[str, Any], body: Callable[[Any], dict]):
    """Parse flags, run ``body(cfg) -> results`` with stdout diverted, print the JSON line."""
    cfg = parse(config_cls, quick)
    with stdout_to_stderr() as out:
        results = body(cfg)
    emit(name, cfg, results, stream=out)


# ------------------------------------------------------------------------------ statistics
def summarize(xs: Sequence[float], digits: int = 6) -> dict[str, float]:
    """Median and spread of timings: median, min, max, quartiles, relative IQR."""
    xs = sorted(float(x) for x in xs)
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    med = statistics.median(xs)
    r = lambda v: round(v, digits)  # noqa: E731
    return {"n": len(xs), "median": r(med), "min": r(xs[0]), "max": r(xs[-1]), "p25": r(q[0]),
            "p75": r(q[2]), "iqr_rel": round((q[2] - q[0]) / med, 4) if med else 0.0}


def interleaved(fns: Mapping[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Time each ``fn()`` ``reps`` times, interleaved, alternating the order every repetition
    (ABAB.. then BABA..) so that drift in machine load hits every variant alike."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t = time.perf_counter()
            fns[n]()
            out[n].append(time.perf_counter() - t)
    return out


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-repetition ratios ``num[i] / den[i]`` (each pair ran back to back)."""
    return [a / b for a, b in zip(num, den, strict=True)]


class CompileCounter:
    """Counts XLA backend compilations (jax's monitoring events) while registered."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.count = 0
        self.seconds = 0.0
        self._fn = self._on_event
        jax.monitoring.register_event_duration_secs_listener(self._fn)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event == self.EVENT:
            self.count += 1
            self.seconds += duration

    def close(self) -> None:
        import jax

        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(self._fn)


# ------------------------------------------------------------------------------ the CLI's assembly
def make_engine(cfg, mesh=None, run_task=None, **kwargs):
    """The training system of a command-line run of ``cfg`` (a `TrainConfig`), built by the
    CLI's own assembly: ``make_task(cfg)`` -> ``build_engine(cfg, run_task, mesh, **kwargs)``.

    ``mesh`` defaults to ``make_mesh(cfg.mesh)``; pass ``run_task`` to skip rebuilding the task
    (its data) for another engine of the same config. The engine's ``data`` is a live
    `DevicePrefetcher`: close it when done.
    """
    from distributed.cli.run import build_engine
    from distributed.cli.tasks import make_task
    from distributed.core.mesh import make_mesh

    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    return build_engine(cfg, make_task(cfg) if run_task is None else run_task, mesh, **kwargs)


class Engines:
    """Fresh engines (state, input pipeline, phase-following step) of one run config on one
    mesh, all training with the compiled `TrainStep` of the first one, so that repetitions of a
    run compile nothing: every `new` engine is a CLI run's engine (`make_engine`) built with
    the first engine's `TrainStep` (``build(..., train_step=)``: same config and mesh, hence the
    same loss, optimizers, blocks, shardings and options).
    """

    def __init__(self, cfg, mesh=None):
        from distributed.cli.tasks import make_task
        from distributed.core.mesh import make_mesh

        self.cfg = cfg
        self.mesh = make_mesh(cfg.mesh) if mesh is None else mesh
        self.run_task = make_task(cfg)
        self.train_step = None

    def new(self):
        engine = make_engine(self.cfg, self.mesh, self.run_task, train_step=self.train_step)
        self.train_step = engine.train_step
        return engine


def run_engine(engine, checkpointer=None, log_every: int = 25):
    """Train ``engine`` to its end as ``python -m distributed.train`` does (`run_loop` over its
    ``step_fn``, ``data`` and ``clock``), without validation, writers or progress display.
    Returns ``(state, LoopResult)`` with the state ready (blocked on)."""
    import jax

    from distributed.loop import run_loop

    state, result = run_loop(engine.state, engine.step_fn, data_iterator=engine.data,
                             num_epochs=engine.total_epochs, clock=engine.clock,
                             checkpointer=checkpointer, show_progress=False,
                             log_every=log_every)
    jax.block_until_ready(state)
    return state, result


def scalar_loss(loss_fn: Callable) -> Callable:
    """``(model, batch) -> scalar`` from a task's loss (which may return a `Ratio` and an aux
    dict): the plain loss a hand-written step differentiates."""
    from distributed import Ratio

    def fn(model, batch):
        out = loss_fn(model, batch)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
            out = out[0]
        return out.value() if isinstance(out, Ratio) else out

    return fn


def mlp_task(width: int, depth: int, rows: int = 64):
    """An engine `Task` of MLP(8 -> width x depth -> 2) + Adam (one block, ``"all"``) on the
    CLI's tabular data: the states of the checkpoint and memory benchmarks."""
    import jax

    from distributed.cli.tasks import tabular_data
    from distributed.core import bcd
    from distributed.core.losses import mse_loss
    from distributed.core.optim import OptimizerConfig, make_optimizer
    from distributed.engine import Task
    from distributed.models import MLP

    return Task(model=lambda: MLP(8, 2, width, depth, key=jax.random.key(0)),
                loss_fn=lambda m, b: mse_loss(m(b["x"]), b["y"], as_ratio=True),
                train=tabular_data(rows, 0), plan=bcd.single_phase_plan(1),
                optimizers={"all": make_optimizer(OptimizerConfig())})


def block(tree: Any) -> Any:
    import jax

    return jax.block_until_ready(tree)
