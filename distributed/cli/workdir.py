"""The run folder: checks before anything is written, one lock per run, writes that never follow
a symlink and never leave a half-written file.

Nothing here writes until the run is committed to go ahead: a refused attempt changes nothing on
disk (the lock file it may have taken is removed again).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from ..checkpoint.leaves import jsonable
from .config import TrainConfig, from_dict, result_fields

log = logging.getLogger(__name__)

LOCK = ".lock"
OUTPUTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "model.eqx",
           "tensorboard", "report", "logs")


class SetupError(Exception):
    """Bad input found before training: reported as one line with exit code 2."""


def _os_error(path: Path, e: OSError, what: str) -> SetupError:
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
        return SetupError(f"no space left on the device to {what} {path} ({free} bytes free); "
                          f"free some space or use another --workdir.")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SetupError(f"cannot {what} {path} ({e.strerror}); the folder is not writable: "
                          f"fix its permissions or use another --workdir.")
    return SetupError(f"cannot {what} {path} ({e.strerror}); use another --workdir.")


def write_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file, then a rename), never following
    a symlink at the temporary or the final name.

    Raises:
        SetupError: the path is a symlink or cannot be written (naming it and why).
    """
    if path.is_symlink():
        raise SetupError(f"{path} is a symbolic link; the run never writes through links. "
                         f"Remove it or use another --workdir.")
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_symlink():
        raise SetupError(f"{tmp} is a symbolic link; the run never writes through links. "
                         f"Remove it or use another --workdir.")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a leftover of an interrupted write
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _os_error(path, e, "write") from None


def write_json(path: Path, obj: Any) -> None:
    """`write_file` of strict JSON (NaN and infinities become ``null``)."""
    write_file(path, json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def open_append(path: Path):
    """Open ``path`` for appending, refusing a symlink (``O_NOFOLLOW``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SetupError(f"{path} is a symbolic link; the run never writes through links. "
                             f"Remove it or use another --workdir.") from None
        raise _os_error(path, e, "open") from None
    return os.fdopen(fd, "a", encoding="utf-8")


class Workdir:
    """The run folder of ``cfg.workdir``, resolved once (symlinks and ``..`` as the OS sees
    them): every output goes inside it."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.path = Path(cfg.workdir).expanduser().resolve()
        self.checkpoints = self.path / "checkpoints"
        self._locked = False

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- checks (read only) ---------------------------------------------------------------
    def check(self) -> dict | None:
        """Read-only checks; returns the config this folder's run was made with (or None).

        Raises:
            SetupError: not a folder; a folder with other files but no run; ``config.json`` or
                ``checkpoints`` of the wrong kind; a different run's config.
        """
        cfg, p = self.cfg, self.path
        if p.exists() and not p.is_dir():
            raise SetupError(f"--workdir={cfg.workdir} exists and is not a folder; choose another.")
        if not p.exists():
            return None
        for name in (*OUTPUTS, *(f".{n}.tmp" for n in OUTPUTS), LOCK):
            if (p / name).is_symlink():
                raise SetupError(f"{p / name} is a symbolic link; the run never writes through "
                                 f"links. Remove it or use another --workdir.")
        cfg_path = p / "config.json"
        if cfg_path.exists() and not cfg_path.is_file():
            raise SetupError(f"{cfg_path} is not a file; move it away or use another --workdir.")
        if self.checkpoints.exists() and not self.checkpoints.is_dir():
            raise SetupError(f"{self.checkpoints} is not a folder; move it away or use another "
                             f"--workdir.")
        if not cfg_path.exists():
            others = sorted(x.name for x in p.iterdir() if x.name != LOCK)
            if others and not cfg.force and not self.checkpoints.exists():
                raise SetupError(
                    f"--workdir={cfg.workdir} is not empty ({', '.join(others[:3])}"
                    f"{', ...' if len(others) > 3 else ''}) but holds no run (no config.json or "
                    f"checkpoints/); "
                    f"use an empty or new --workdir, or --force to use it anyway.")
            return None
        try:
            old = from_dict(json.loads(cfg_path.read_text()))
        except (ValueError, TypeError) as e:
            if cfg.force or cfg.restart_from_scratch:
                return None
            raise SetupError(f"{cfg_path} is not a valid config ({e}); use another --workdir or "
                             f"pass --force to overwrite it.") from None
        except OSError as e:
            raise _os_error(cfg_path, e, "read") from None
        if not (cfg.force or cfg.restart_from_scratch):
            check_same_run(old, cfg, f"--workdir={cfg.workdir} holds a different run")
        return old.to_dict()

    # -- the lock ---------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the run's lock (``<workdir>/.lock``: host, pid, start time).

        A lock held by a live process, or by another host, refuses the run; a stale lock (its
        holder is dead, same host) is taken over with a warning.

        Raises:
            SetupError: naming the holder.
        """
        if self._locked:
            return
        path = self.path / LOCK
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds")}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is None and _age_s(path) < 10:  # being written by its holder
                    holder = {"host": "?", "pid": "?", "started": "just now"}
                if holder is not None and not _stale(holder):
                    raise SetupError(
                        f"--workdir={self.cfg.workdir} is in use by another run (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}, started "
                        f"{holder.get('started')}); wait for it to finish, stop it, or use "
                        f"another --workdir.") from None
                log.warning("taking over the stale lock %s (%s)", path, holder or "unreadable")
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            except OSError as e:
                raise _os_error(path, e, "create") from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(record, f)
            except OSError as e:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise _os_error(path, e, "write") from None
            self._locked = True
            return
        raise SetupError(f"could not take the lock {path}; another run started at the same "
                         f"time. Use another --workdir.")

    def unlock(self) -> None:
        if self._locked:
            with contextlib.suppress(OSError):
                (self.path / LOCK).unlink()
            self._locked = False

    def create(self) -> None:
        """Create the folder (and its parents)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SetupError(f"--workdir={self.cfg.workdir} cannot be created ({e.strerror}); "
                             f"choose a writable folder.") from None

    def restart_from_scratch(self) -> None:
        """Delete ``checkpoints/`` (only checkpoint steps may be in it)."""
        ck = self.checkpoints
        if not ck.exists():
            return
        foreign = sorted(p.name for p in ck.iterdir()
                         if not (p.is_dir() and p.name.split(".")[0].isdigit()))
        if foreign:
            raise SetupError(
                f"--restart_from_scratch would delete {ck}, which holds files that are not "
                f"checkpoint steps ({', '.join(foreign[:3])}); move them away or use another "
                f"--workdir.")
        shutil.rmtree(ck)


def disk_full(e: BaseException, workdir: Path) -> str | None:
    """One line for an error whose cause is a full disk (however deeply Orbax or TensorStore
    wrapped it), naming the path and the free space; None for other errors."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
            where = getattr(e, "filename", None) or workdir
            try:
                free = shutil.disk_usage(workdir).free
            except OSError:
                free = "?"
            return (f"no space left on the device while writing {where} ({free} bytes free in "
                    f"{workdir}); the last committed checkpoint is intact: free some space and "
                    f"rerun to resume.")
        e = e.__cause__ or e.__context__
    return None


def check_same_run(old: TrainConfig, new: TrainConfig, what: str,
                   fix: str = "--force to reuse it") -> None:
    """Raise `SetupError` if ``old`` and ``new`` differ in a field that changes the result
    (``fix``: what to pass instead of a new workdir)."""
    a, b = result_fields(old), result_fields(new)
    diff = {k: (v, b.get(k)) for k, v in a.items() if b.get(k) != v}
    if diff:
        k, (was, now) = next(iter(diff.items()))
        raise SetupError(f"{what} (--{k} was {was!r}, now {now!r}"
                         f"{' and more' if len(diff) > 1 else ''}); use a new --workdir, or "
                         f"{fix}.")


def _read_lock(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def _age_s(path: Path) -> float:
    try:
        return datetime.datetime.now().timestamp() - path.stat().st_mtime
    except OSError:
        return 0.0


def _stale(holder: dict) -> bool:
    """A lock whose holder is a dead process on this host."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False
