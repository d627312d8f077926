"""A goodput ledger: where the wall time of a run went, and the productive fraction.

Categories (seconds): ``setup`` (runtime, mesh, data and checkpoint-manager set-up, timed by the
command line), ``compile`` (jax's compile events, wherever they happen), ``step`` (dispatching
steps and waiting for their results), ``data_wait``, ``checkpoint_blocking``, ``validation``,
``restore``, ``logging`` (the host's share of log points and epoch ends: log lines, metric
records, the progress display), and ``other`` = wall minus all of them (the loop's own Python,
callbacks, the final outputs), so the parts add up to the wall time by construction (a test
checks that no two overlap).

Work lost on a restart: when a run resumes, `read_previous_attempt` reads the workdir's
``metrics.jsonl``: the last step the previous attempt logged and that attempt's step rate (from
the ``goodput.wall_s`` carried by each record). ``lost_steps = last logged - restored step`` and
``lost_s = lost_steps / rate``: a lower bound (time after the last log line is not known).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax

_DONE = object()
CATEGORIES = ("setup", "compile", "step", "data_wait", "checkpoint_blocking", "validation",
              "restore", "logging")


class Ledger:
    """Accumulates seconds per category; compile time comes from jax's compile events.

    ``step`` is the host time spent calling the train step, and waiting for its results (the
    loop times those waits as ``step`` too), minus compilation: with asynchronous dispatch it is
    the device compute time as seen by the loop. ``goodput`` = step / wall.
    """

    def __init__(self, samples_per_step: int = 0):
        self.t0 = time.perf_counter()
        self.seconds = {c: 0.0 for c in CATEGORIES}
        self.saves: list[dict[str, Any]] = []
        self.samples_per_step = samples_per_step
        self.lost_s = 0.0
        self.lost_steps = 0
        self.resumed_from: int | None = None
        self.previous: dict[str, Any] | None = None
        self._rate_mark: tuple[float, int] | None = None
        self._thread = threading.get_ident()  # the timed thread: its compiles hold it up
        self._open: list[float] = []  # per open timer: seconds of timers nested in it
        self._listener = self._on_event
        jax.monitoring.register_event_duration_secs_listener(self._listener)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        # a compile on another thread (e.g. a checkpoint worker's) overlaps the timed thread's
        # time: it is not wall time of its own
        if event.startswith("/jax/core/compile/") and threading.get_ident() == self._thread:
            self.seconds["compile"] += duration

    def close(self) -> None:
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(self._listener)

    @contextlib.contextmanager
    def timer(self, category: str):
        """Time a block into ``category``; compilation inside it counts as ``compile`` only, and
        a timer nested in it (e.g. ``restore`` inside ``setup``) counts in its own category only."""
        compile_before = self.seconds["compile"]
        self._open.append(0.0)
        t = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t
            compiled = self.seconds["compile"] - compile_before
            own = max(0.0, spent - compiled - self._open.pop())
            self.seconds[category] = self.seconds.get(category, 0.0) + own
            if self._open:  # the enclosing timer excludes all of this block
                self._open[-1] += max(0.0, spent - compiled)

    def step_timer(self, step: int):
        del step
        return self.timer("step")

    def timed_iter(self, it: Iterable, category: str) -> Iterator:
        """``it``, with the time spent waiting for each item counted into ``category``
        (compilation meanwhile, e.g. of a host-side jax op, counts as ``compile`` only)."""
        it = iter(it)
        while True:
            with self.timer(category):
                item = next(it, _DONE)
            if item is _DONE:
                return
            yield item

    def note_resume(self, step: int, lost_steps: int | None = None,
                    lost_s: float | None = None) -> None:
        """A resume from ``step``; the lost work is estimated from `previous` unless given."""
        self.resumed_from = step
        prev = self.previous or {}
        if lost_steps is None:
            last = prev.get("last_step")
            lost_steps = max(0, last - step) if last is not None else 0
        if lost_s is None:
            rate = prev.get("steps_per_sec")
            lost_s = lost_steps / rate if lost_steps and rate else 0.0
        self.lost_steps, self.lost_s = int(lost_steps), float(lost_s)

    def resume_record(self) -> dict[str, Any]:
        """What a resume record in metrics.jsonl says."""
        prev = self.previous or {}
        return {"resumed_from_step": self.resumed_from,
                "previous_last_logged_step": prev.get("last_step"),
                "lost_steps": self.lost_steps, "lost_s": round(self.lost_s, 3)}

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

    def snapshot(self) -> dict[str, float]:
        """Running totals (no per-save list): carried by each metrics.jsonl record."""
        wall = self.wall()
        out = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        out["other_s"] = round(max(0.0, wall - sum(self.seconds.values())), 3)
        out["wall_s"] = round(wall, 3)
        out["goodput"] = round(self.seconds["step"] / wall, 4) if wall > 0 else 0.0
        return out

    def summary(self) -> dict[str, Any]:
        wall = self.wall()
        accounted = sum(self.seconds.values())
        out: dict[str, Any] = {f"{k}_s": round(v, 4) for k, v in self.seconds.items()}
        out["other_s"] = round(max(0.0, wall - accounted), 4)
        out["wall_s"] = round(wall, 4)
        out["goodput"] = round(self.seconds["step"] / wall, 4) if wall > 0 else 0.0
        out["lost_steps_on_restart"] = self.lost_steps
        out["lost_s_on_restart"] = round(self.lost_s, 4)
        out["resumed_from_step"] = self.resumed_from
        out["previous_attempt_last_step"] = (self.previous or {}).get("last_step")
        out["saves"] = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
                        for r in self.saves]
        return out


def read_previous_attempt(path: str | os.PathLike) -> dict[str, Any] | None:
    """The last attempt's progress in a ``metrics.jsonl``: ``{"last_step", "steps_per_sec"}``.

    The last attempt is the records after the last ``"event": "resume"`` record. Lines that are
    not JSON objects (e.g. the half-written last line of a killed process) are skipped. The rate
    is steps per wall second between that attempt's first and last records carrying
    ``goodput.wall_s`` (so it includes checkpoints, validation and data waits, not compilation),
    else its last ``steps_per_sec``. Returns None when there is no such file or no step record.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    attempt: list[dict[str, Any]] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if rec.get("event") == "resume":
            attempt = []
        elif "event" not in rec:
            attempt.append(rec)
    if not attempt:
        return None
    timed = [(r["step"], r["goodput"]["wall_s"]) for r in attempt
             if isinstance(r.get("goodput"), dict)
             and isinstance(r["goodput"].get("wall_s"), (int, float))]
    rate = None
    if len(timed) >= 2 and timed[-1][1] > timed[0][1] and timed[-1][0] > timed[0][0]:
        rate = (timed[-1][0] - timed[0][0]) / (timed[-1][1] - timed[0][1])
    else:
        rates = [r["steps_per_sec"] for r in attempt if isinstance(r.get("steps_per_sec"),
                                                                   (int, float))]
        rate = rates[-1] if rates else None
    return {"last_step": max(r["step"] for r in attempt), "steps_per_sec": rate}
