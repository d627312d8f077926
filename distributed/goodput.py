"""A goodput ledger: where the wall time of a run went, and the productive fraction."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax

CATEGORIES = ("compile", "step", "data_wait", "checkpoint_blocking", "validation", "restore")


class Ledger:
    """Accumulates seconds per category; compile time comes from jax's compile events.

    ``step`` is the host time spent calling the train step minus compilation: with
    asynchronous dispatch the host waits there for the device whenever the queue is full, so it
    is the device compute time as seen by the loop. ``goodput`` = step / wall.
    """

    def __init__(self, samples_per_step: int = 0):
        self.t0 = time.perf_counter()
        self.seconds = {c: 0.0 for c in CATEGORIES}
        self.saves: list[dict[str, Any]] = []
        self.samples_per_step = samples_per_step
        self.lost_s = 0.0
        self.lost_steps = 0
        self.resumed_from: int | None = None
        self._rate_mark: tuple[float, int] | None = None
        self._listener = self._on_event
        jax.monitoring.register_event_duration_secs_listener(self._listener)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds["compile"] += duration

    def close(self) -> None:
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(self._listener)

    @contextlib.contextmanager
    def timer(self, category: str):
        """Time a block into ``category``; compilation inside it counts as ``compile`` only."""
        compile_before = self.seconds["compile"]
        t = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t
            compiled = self.seconds["compile"] - compile_before
            self.seconds[category] = self.seconds.get(category, 0.0) + max(0.0, spent - compiled)

    def step_timer(self, step: int):
        del step
        return self.timer("step")

    def timed_iter(self, it: Iterable, category: str) -> Iterator:
        it = iter(it)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.seconds[category] += time.perf_counter() - t
                return
            self.seconds[category] += time.perf_counter() - t
            yield item

    def note_resume(self, step: int, lost_steps: int = 0, lost_s: float = 0.0) -> None:
        self.resumed_from = step
        self.lost_steps, self.lost_s = lost_steps, lost_s

    def record_save(self, record: Any) -> None:
        """Keep a save's stats (a dataclass whose totals may be filled in on commit)."""
        self.saves.append(record)

    def rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        out: dict[str, float] = {}
        if self._rate_mark is not None and step > self._rate_mark[1]:
            dt = now - self._rate_mark[0]
            steps = step - self._rate_mark[1]
            out["steps_per_sec"] = steps / dt
            if self.samples_per_step:
                out["samples_per_sec"] = steps * self.samples_per_step / dt
        self._rate_mark = (now, step)
        return out

    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def summary(self) -> dict[str, Any]:
        wall = self.wall()
        accounted = sum(self.seconds.values())
        out: dict[str, Any] = {f"{k}_s": round(v, 4) for k, v in self.seconds.items()}
        out["other_s"] = round(max(0.0, wall - accounted), 4)
        out["wall_s"] = round(wall, 4)
        out["goodput"] = round(self.seconds["step"] / wall, 4) if wall > 0 else 0.0
        out["lost_steps_on_restart"] = self.lost_steps
        out["lost_s_on_restart"] = round(self.lost_s, 4)
        out["saves"] = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
                        for r in self.saves]
        return out
