"""Where the command line's log records go: the console (process 0 at INFO, the others at
WARNING; other libraries' error tracebacks stay off it) and, once the run folder exists, a log
file per process in ``<workdir>/logs/`` holding every record from the start."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _Console(logging.Filter):
    """Other libraries' records reach the console only as warnings and errors without a
    traceback (the run reports an error itself, in one line); the log file keeps them all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "distributed" or record.name.startswith("distributed."):
            return True
        return record.levelno >= logging.WARNING and record.exc_info is None


class _LogFile(logging.FileHandler):
    """A log file that gives up quietly when it cannot be written (a full disk): the console
    still says what happened, without a logging traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:
        logging.getLogger().removeHandler(self)
        try:
            self.close()
        except OSError:
            pass


def console(level: int = logging.INFO) -> logging.Handler:
    """Route log records to stderr (call once, before anything logs)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_Console())
    handler.setLevel(level)
    root.addHandler(handler)
    # Records from before the run folder exists wait here for the log file (`to_file`).
    early = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    early.setLevel(logging.INFO)
    root.addHandler(early)
    root.setLevel(logging.INFO)
    return handler


def for_process(index: int) -> None:
    """Only process 0 writes INFO lines to the console; the others only warnings and errors."""
    if index == 0:
        return
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)


def to_file(workdir: Path, index: int) -> Path:
    """Also write every record (INFO and up, every library) to ``logs/process-<i>.log``."""
    folder = workdir / "logs"
    folder.mkdir(exist_ok=True)
    path = folder / f"process-{index}.log"
    handler = _LogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s p{index} %(levelname)s %(name)s "
                                           f"%(message)s"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    for early in [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        early.setTarget(handler)
        early.flush()
        root.removeHandler(early)
        early.close()
    root.addHandler(handler)
    return path
