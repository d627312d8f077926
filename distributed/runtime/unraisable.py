"""Keep Orbax/TensorStore's late write callbacks off the terminal after a failed save.

When an asynchronous checkpoint write fails (a full disk, a lost mount), Orbax closes the asyncio
event loop that awaited it while TensorStore still holds callbacks for the other chunks' writes;
each then hits ``RuntimeError('Event loop is closed')`` inside ``loop.call_soon_threadsafe`` and
Python reports it through `sys.unraisablehook` -- dozens of tracebacks that bury the one real
error. `route_closed_loop_callbacks_to_log` routes exactly those to the log (DEBUG, once) and passes
every other unraisable exception to the hook that was installed before.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("distributed")


def _is_closed_loop_callback(u) -> bool:
    e = u.exc_value
    if not isinstance(e, RuntimeError) or str(e) != "Event loop is closed":
        return False
    tb = u.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


def route_closed_loop_callbacks_to_log() -> None:
    """Install the filter for the rest of the process (the command line owns its process; the
    callbacks can arrive up to interpreter exit). Idempotent."""
    previous = sys.unraisablehook
    if getattr(previous, "_routes_closed_loop_callbacks", False):
        return
    seen = []

    def hook(u) -> None:
        if not _is_closed_loop_callback(u):
            previous(u)
        elif not seen:
            seen.append(True)
            log.debug("late TensorStore write callbacks after a failed checkpoint save "
                      "(event loop already closed) are ignored")

    hook._routes_closed_loop_callbacks = True
    sys.unraisablehook = hook
