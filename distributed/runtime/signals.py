"""Preemption: SIGTERM / SIGINT / SIGUSR1 ask the run to checkpoint and stop at a step that all
processes agree on.

On by default in the command line: the handler is installed before jax is even imported, so a
signal that arrives during start-up, the first compilation, a restore, validation or an
asynchronous save is remembered; the loop checks at the next step boundary (before fetching the
next batch, so the saved data position matches the saved step), saves a checkpoint there, waits
until it is committed, and the process exits with `PREEMPTED_EXIT_CODE` (42).
``launch/slurm.sbatch`` requeues a job that ends with 42. A second SIGINT stops at once
(KeyboardInterrupt); a second SIGTERM/SIGUSR1 is ignored (the stop is already under way).

Agreement across processes: every ``sync_every`` steps each process contributes its local flag to
a max all-gather (`jax.experimental.multihost_utils.process_allgather`), so all processes decide
"stop" at the same step even when the signal reached them at different times, or reached only
one of them. The all-gather is a collective over every process, called at the same steps on all
of them (steps advance in lockstep), so it cannot deadlock while all processes are alive; when
one has died, the watchdog (`distributed.watchdog`) ends the others. jax's own preemption sync
manager (``multihost_utils.reached_preemption_sync_point``) only listens to SIGTERM and needs the
coordination service's preemption notifier; this covers SIGINT/SIGUSR1 and one process alike.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from .exit_codes import PREEMPTED

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Exit code of a run that stopped on a preemption signal after saving its checkpoint.
# launch/slurm.sbatch requeues the job when it sees it.
PREEMPTED_EXIT_CODE = PREEMPTED


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
        if self._previous or threading.current_thread() is not threading.main_thread():
            return self
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def ensure_installed(self) -> None:
        """Re-install the handlers if something replaced them (e.g. a library's own SIGTERM
        handler installed after ours); logs a warning when it had to."""
        if not self._previous:
            return
        taken = [s for s in self._signals if signal.getsignal(s) != self._handle]
        for s in taken:
            signal.signal(s, self._handle)
        if taken:
            log.warning("re-installed the preemption handler for %s",
                        ", ".join(signal.Signals(s).name for s in taken))

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @staticmethod
    def keep_jax_away() -> None:
        """Stop ``jax.distributed.initialize`` from installing jax's own SIGTERM handler (its
        preemption notifier, which would swallow SIGTERM for this StopRequest). Call before it."""
        import jax

        try:
            jax.config.update("jax_enable_preemption_service", False)
        except (AttributeError, KeyError, ValueError):  # an older jax without the option
            pass

    def _handle(self, signum, frame):
        if self._flag.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            return  # already stopping
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

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def requested(self, step: int) -> bool:
        """Whether to stop before ``step + 1``: a collective in multi-process runs (call it on
        every process at every step boundary)."""
        if self.decided_at is not None:
            return True
        import jax

        if jax.process_count() == 1:
            decided = self._flag.is_set()
        else:
            if step % self.sync_every:
                return False
            import numpy as np
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.array([int(self._flag.is_set())]))
            decided = bool(np.max(flags))
        if decided:
            self.decided_at = step
        return decided
