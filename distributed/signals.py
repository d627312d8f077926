"""Preemption: SIGTERM / SIGINT / SIGUSR1 ask the run to checkpoint and stop at a step that all
processes agree on."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import jax
import numpy as np

log = logging.getLogger("distributed")

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Exit code of a run that stopped on a preemption signal after saving its checkpoint.
# launch/slurm.sbatch requeues the job when it sees it.
PREEMPTED_EXIT_CODE = 42


class StopRequest:
    """Set by a signal handler; `requested(step)` is the collective decision to stop.

    With one process the decision is the local flag. With several, the flags are combined
    with a max all-gather every ``sync_every`` steps, so every process stops at the same step
    (the step at which the first all-gather after any signal happens).
    """

    def __init__(self, sync_every: int = 10, signals=PREEMPTION_SIGNALS):
        self._flag = threading.Event()
        self.signum: int | None = None
        self.sync_every = sync_every
        self._previous: dict[int, Any] = {}
        self._signals = signals
        self.decided_at: int | None = None

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self._flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum
        self._flag.set()
        log.warning("received %s: will checkpoint and stop at the next agreed step",
                    signal.Signals(signum).name)

    def trigger(self) -> None:
        """Request a stop programmatically (e.g. from a watchdog or a test)."""
        self._flag.set()

    @property
    def local(self) -> bool:
        return self._flag.is_set()

    def requested(self, step: int) -> bool:
        if self.decided_at is not None:
            return True
        if jax.process_count() == 1:
            decided = self._flag.is_set()
        else:
            if step % self.sync_every:
                return False
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.array([int(self._flag.is_set())]))
            decided = bool(np.max(flags))
        if decided:
            self.decided_at = step
        return decided
