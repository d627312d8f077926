"""The process exit codes of the command line and the launchers (one set, used everywhere)."""

#: Training finished (or a finished run was re-run: nothing to do).
OK = 0
#: Bad input: one ``error:`` line names the value and the fix; nothing was trained or changed.
USAGE = 2
#: A stall: the hang watchdog fired, or ``jax.distributed`` did not start in time. Requeue-able.
STALLED = 3
#: Preempted: a checkpoint was committed at a step all processes agreed on. Requeue-able.
PREEMPTED = 42
