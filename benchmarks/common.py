"""Shared pieces of the benchmarks: flags -> dataclass config, simulated devices, timing,
machine info, the CLI's training wiring, and the single JSON line each benchmark prints.

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


# ------------------------------------------------------------------------------ the CLI's wiring
@dataclasses.dataclass
class System:
    """The pieces `distributed.run` builds for one run: task, mesh, state, step, data."""

    cfg: Any  # distributed.config.TrainConfig
    task: Any
    mesh: Any
    state: Any
    shardings: Any
    step: Any  # distributed.step.TrainStep
    blocks: dict
    spe: int  # steps per epoch


def build_system(cfg, mesh=None, step=None) -> System:
    """Task, mesh, sharded state and `TrainStep` exactly as ``distributed.run`` wires them.

    Pass ``step`` (a `TrainStep` built for the same task and mesh) to reuse its compile cache.
    """
    import jax

    from distributed.data import steps_per_epoch
    from distributed.mesh import make_mesh
    from distributed.run import step_options
    from distributed.state import init_state
    from distributed.step import TrainStep
    from distributed.tasks import make_task

    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    task = make_task(cfg)
    state, shardings = init_state(task.model_fn, task.optimizers, task.blocks_fn,
                                  key=jax.random.key(cfg.seed), mesh=mesh, strategy=cfg.sharding)
    blocks = task.blocks_fn(state.model)
    if step is None:
        step = TrainStep(task.loss_fn, task.optimizers, blocks, mesh=mesh,
                         state_shardings=shardings, options=step_options(cfg))
    n_train = len(next(iter(task.train.values())))
    return System(cfg, task, mesh, state, shardings, step, blocks,
                  steps_per_epoch(n_train, cfg.batch_size))


def phase_step_fn(sys_: System, state_holder: dict | None = None):
    """``train_step_fn(state, batch, key)`` for `run_loop`, switching BCD phases on the host
    step counter and applying the first-run rule, as ``distributed.run`` does."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp
    import numpy as np

    from distributed import bcd
    from distributed.sharding import batch_sharding, shard

    plan, spe, cfg = sys_.task.plan, sys_.spe, sys_.cfg
    bsh = batch_sharding(sys_.mesh)
    st = state_holder if state_holder is not None else {}
    st.setdefault("phase", None)
    st.setdefault("step", 0)

    def fn(state, batch, key):
        del key
        host_step = st["step"]
        p = bcd.phase_at(plan, host_step, spe)
        if p != st["phase"]:
            prev = -1 if st["phase"] is None else st["phase"]
            model = bcd.enter_phase(state.model, plan, prev, p)
            if model is not state.model:
                model = shard(model, sys_.shardings.model)
            phase = jax.device_put(jnp.asarray(p, jnp.int32), state.phase.sharding)
            state = dc.replace(state, model=model, phase=phase)
            st["phase"] = p
        extras = sys_.task.batch_extras(host_step // spe)
        if extras:
            batch = dict(batch, **{k: jax.device_put(np.full((cfg.batch_size,), v, np.float32),
                                                     bsh) for k, v in extras.items()})
        st["step"] = host_step + 1
        return sys_.step(state, batch, plan[p].blocks)

    return fn


def total_epochs(sys_: System) -> int:
    return sum(p.epochs for p in sys_.task.plan)


def system_data(sys_: System, prefetch: int = 2):
    """The CLI's training input: Grain dataset of global batches + `DevicePrefetcher`."""
    from distributed.data import DevicePrefetcher, make_dataset

    ds = make_dataset(sys_.task.train, global_batch_size=sys_.cfg.batch_size,
                      seed=sys_.cfg.seed, num_epochs=None)
    return DevicePrefetcher(iter(ds), sys_.mesh, size=prefetch)


def block(tree: Any) -> Any:
    import jax

    return jax.block_until_ready(tree)
