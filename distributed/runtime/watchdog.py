"""Hang watchdog: a step, data fetch or save that makes no progress for too long ends the run.

A background thread watches the *beats* of the training loop. Each `Watchdog.beat(what)` says
"`what` starts now and must be over (the next beat) within ``timeout_s``". When a deadline passes,
the watchdog

1. writes every Python thread's stack (``faulthandler``) to stderr and, when ``log_dir`` is set,
   to ``<log_dir>/watchdog-p<process>.txt``;
2. prints ONE line ``error: watchdog: ...`` naming the stalled activity, the limit and the fix;
3. ends the process at once with `STALLED` (3), without running cleanup code that could
   hang in turn (e.g. a collective waiting for a dead peer). The last *committed* checkpoint is
   intact (an interrupted save is never committed), so rerunning resumes from it.

XLA compilation is not a hang: while jax compiles (tracked through ``jax.monitoring``: every
``/jax/core/compile/*`` phase reports its start as a scalar event and its end as a duration
event), deadlines are suspended, and the next deadline counts from the end of compilation. A
stuck compile is therefore not detected (jax's heartbeat or the scheduler's time limit is the
backstop there).

In a multi-process run a process that dies leaves the others blocked in their next collective
(gloo/NCCL wait forever; jax's coordination service aborts them only after its heartbeat timeout,
100 s by default, and only once process 0 notices). The watchdog turns that into a clear exit
within ``timeout_s`` of the stall.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Any

from .exit_codes import STALLED

log = logging.getLogger(__name__)

_COMPILE_PREFIX = "/jax/core/compile/"


class Watchdog:
    """Ends the process when the current activity overruns its deadline.

    Args:
        timeout_s: seconds each activity (between two beats) may take; ``<= 0``: disabled
            (every method is then a cheap no-op).
        log_dir: where to also write the thread dump (``watchdog-p<process>.txt``).
        process_index: named in messages and the dump file.
        exit_code: the process exit code when it fires.
        on_fire: called (instead of exiting) when it fires, with the message; for tests.

    Use: ``wd = Watchdog(600).start(); wd.beat("step 5"); ...; wd.stop()``, or as a context
    manager. ``beat`` is cheap (no lock, no allocation beyond a tuple).
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        log_dir: str | os.PathLike | None = None,
        process_index: int = 0,
        exit_code: int = STALLED,
        on_fire=None,
    ):
        self.timeout_s = float(timeout_s or 0.0)
        self.enabled = self.timeout_s > 0
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.process_index = process_index
        self.exit_code = exit_code
        self.on_fire = on_fire
        self.fired: str | None = None
        self._current: tuple[str, float, float] = ("start", time.monotonic(), self.timeout_s)
        self._compiling = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: tuple[Any, Any] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Watchdog:
        if not self.enabled or self._thread is not None:
            return self
        self._install_compile_listeners()
        self.beat("start")
        self._thread = threading.Thread(target=self._run, name="distributed-watchdog",
                                        daemon=True)
        self._thread.start()
        log.info("watchdog: %.0f s per step / data fetch / save (exit code %d on a stall)",
                 self.timeout_s, self.exit_code)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._remove_compile_listeners()

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ beats
    def beat(self, what: str, timeout_s: float | None = None) -> None:
        """`what` starts now; it must be over (next beat) within ``timeout_s`` (default: the
        watchdog's)."""
        if self.enabled:
            self._current = (what, time.monotonic(), self.timeout_s if timeout_s is None
                             else float(timeout_s))

    @property
    def activity(self) -> str:
        return self._current[0]

    # ------------------------------------------------------------------ compile tracking
    def _install_compile_listeners(self) -> None:
        try:
            import jax.monitoring as mon
        except Exception:  # noqa: BLE001 - without jax there is nothing to compile
            return

        def started(event: str, value: float, **_: Any) -> None:
            if event.startswith(_COMPILE_PREFIX):
                with self._lock:
                    self._compiling += 1

        def finished(event: str, duration: float, **_: Any) -> None:
            if event.startswith(_COMPILE_PREFIX):
                with self._lock:
                    self._compiling = max(0, self._compiling - 1)
                what, _, limit = self._current
                self._current = (what, time.monotonic(), limit)  # count from compile's end

        mon.register_scalar_listener(started)
        mon.register_event_duration_secs_listener(finished)
        self._listeners = (started, finished)

    def _remove_compile_listeners(self) -> None:
        if self._listeners is None:
            return
        import jax.monitoring as mon

        started, finished = self._listeners
        for fn in (lambda: mon.unregister_scalar_listener(started),
                   lambda: mon.unregister_event_duration_listener(finished)):
            try:
                fn()
            except Exception:  # noqa: BLE001
                pass
        self._listeners = None

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        poll = min(1.0, max(0.05, self.timeout_s / 8))
        while not self._stop.wait(poll):
            what, since, limit = self._current
            if self._compiling:
                continue
            overdue = time.monotonic() - since
            if limit > 0 and overdue > limit:
                self._fire(what, overdue, limit)
                return

    def _fire(self, what: str, overdue: float, limit: float) -> None:
        msg = (f"watchdog: process {self.process_index}: '{what}' made no progress for "
               f"{overdue:.0f} s (limit --watchdog_s={limit:g}); a peer process may have died, or "
               f"a collective, the input pipeline or storage is stuck (thread stacks above). "
               f"Exiting with code {self.exit_code}; rerun (or requeue) to resume from the last "
               f"committed checkpoint, or raise --watchdog_s.")
        self.fired = msg
        if self.log_dir:  # first the file: stderr may be a pipe nobody reads any more
            try:
                os.makedirs(self.log_dir, exist_ok=True)
                path = os.path.join(self.log_dir, f"watchdog-p{self.process_index}.txt")
                with open(path, "w") as f:
                    f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)
            except Exception:  # noqa: BLE001
                pass

        def to_stderr():
            try:
                err = sys.stderr
                err.write(f"[watchdog] process {self.process_index}: '{what}' overdue "
                          f"({overdue:.1f} s > {limit:g} s); Python thread stacks:\n")
                err.flush()
                faulthandler.dump_traceback(file=err, all_threads=True)
                if self.on_fire is None:
                    err.write(f"error: {msg}\n")
                err.flush()
            except Exception:  # noqa: BLE001 - stderr may be closed; still exit
                pass

        writer = threading.Thread(target=to_stderr, name="distributed-watchdog-dump",
                                  daemon=True)
        writer.start()
        writer.join(10.0)  # a blocked stderr must not keep a hung process alive
        if self.on_fire is not None:
            self.on_fire(msg)
            return
        os._exit(self.exit_code)
