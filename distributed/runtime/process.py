"""Process start: ``jax.distributed`` wiring (explicit, environment, SLURM, TPU/MPI), process
info.

Nothing here knows about models. The usual order in a program is::

    from distributed import runtime
    runtime.configure_host_devices(n)      # CPU only, before jax starts its backends
    info = runtime.initialize()            # explicit args, env vars, or auto-detect
    print(info.log_line())
    mesh = ...; runtime.check_devices(mesh)

How :func:`initialize` finds its peers (first match wins):

1. explicit ``coordinator_address``, ``num_processes``, ``process_id`` (all three or none);
2. ``DISTRIBUTED_COORDINATOR_ADDRESS`` / ``DISTRIBUTED_NUM_PROCESSES`` / ``DISTRIBUTED_PROCESS_ID``
   (set by ``launch/local.py``; all three or none);
3. SLURM, inside an ``srun`` step with more than one task (``SLURM_JOB_ID``,
   ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS`` > 1). The coordinator is the first host of the step
   on port ``61440 + SLURM_JOB_ID % 4096`` (JAX's rule; ``JAX_COORDINATOR_PORT`` overrides).
   Two layouts:

   * one task per node (``--ntasks-per-node=1``): the process sees *all* of its node's GPUs;
   * one task per GPU (``--ntasks-per-node=<gpus>``): the process sees GPU ``SLURM_LOCALID`` only
     (JAX's convention), unless SLURM already bound exactly one GPU to the task
     (``--gpus-per-task=1``: ``CUDA_VISIBLE_DEVICES`` holds one id), in which case it sees that one.

   ``DISTRIBUTED_SLURM_DEVICES=all|localid`` forces either layout (default ``auto``).
4. Cloud TPU pods / GKE TPU, Open MPI (``mpirun``): detected as ``jax.distributed.initialize()``
   detects them, and then that function is called with no arguments;
5. otherwise: a single process, no ``jax.distributed`` at all.

jax 0.10.2 quirks: when a peer or the coordinator does not show up within
``initialization_timeout`` (really about timeout + 5 s), jax *aborts the process* (C++ CHECK
failure, SIGABRT) instead of raising; when process 0's port is taken it segfaults. So before
handing over to jax this module probes the coordinator's TCP port itself (a Python
:class:`CoordinatorError` naming the address and the timeout if nothing listens there), checks on
process 0 that the port is free, and runs a watchdog that prints one clear line and exits with
:data:`~distributed.runtime.exit_codes.STALLED` shortly before jax would abort. Once running, a
dead process 0 makes the others abort within about a second; a dead other process makes process 0
abort only after the
heartbeat timeout (``heartbeat_timeout_s``, jax default 100 s) -- launchers stop the rest sooner.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
import sys
import threading
import time

import jax

from .exit_codes import STALLED
from .slurm import parse_int, slurm_detected, slurm_params

ENV_COORDINATOR = "DISTRIBUTED_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DISTRIBUTED_NUM_PROCESSES"
ENV_PROCESS_ID = "DISTRIBUTED_PROCESS_ID"


class CoordinatorError(RuntimeError):
    """The ``jax.distributed`` coordinator could not be reached, bound, or joined."""


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    """What this process is and sees, after :func:`initialize`."""

    process_index: int
    process_count: int
    local_device_count: int
    global_device_count: int
    platform: str
    coordinator_address: str | None = None
    source: str = "single"  # explicit | env | slurm | tpu | ompi | single

    @property
    def is_coordinator(self) -> bool:
        return self.process_index == 0

    def log_line(self) -> str:
        return (
            f"[distributed] process {self.process_index}/{self.process_count}"
            f" platform={self.platform} local_devices={self.local_device_count}"
            f" global_devices={self.global_device_count}"
            f" coordinator={self.coordinator_address or '-'} via={self.source}"
        )


# --------------------------------------------------------------------------- initialize


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _jax_cluster_detected() -> str | None:
    """'tpu' / 'ompi' when jax.distributed.initialize() would auto-detect such a cluster."""
    if os.environ.get("OMPI_MCA_orte_hnp_uri"):
        return "ompi"
    try:
        from jax._src import clusters

        for cls in (clusters.GkeTpuCluster, clusters.GceTpuCluster):
            if cls.is_env_present():
                return "tpu"
    except Exception:
        pass
    return None


def _effective_platform(platform: str | None) -> str | None:
    if platform:
        return platform.split(",")[0].strip().lower()
    value = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    return value.split(",")[0].strip().lower() or None


def _check_port_free(port: int, address: str) -> None:
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            return
        except OSError as e:
            raise CoordinatorError(
                f"cannot start the jax.distributed coordinator for {address}: port {port} on this "
                f"host is already in use ({e.strerror}). Pick another port "
                "(launch/local.py --port, or JAX_COORDINATOR_PORT under SLURM)."
            ) from None
        finally:
            s.close()


def _wait_reachable(address: str, timeout_s: float, process_id: int, num: int) -> None:
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(timeout_s, 0.1))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise CoordinatorError(
                f"could not reach the jax.distributed coordinator at {address} within "
                f"{timeout_s:g} s (process {process_id} of {num}; last error: {last}). "
                "Is process 0 running, and are the address and port right?"
            )
        time.sleep(0.2)


def _watchdog(done: threading.Event, address: str, timeout_s: float, pid: int, num: int):
    def run():
        if done.wait(timeout_s + 2.0):
            return
        sys.stderr.write(
            f"[distributed] ERROR: process {pid} of {num}: jax.distributed did not start within "
            f"{timeout_s:g} s (coordinator {address}): not all {num} processes joined. "
            "Check that every process was started with the same coordinator and process count.\n"
        )
        sys.stderr.flush()
        os._exit(STALLED)

    t = threading.Thread(target=run, name="distributed-init-watchdog", daemon=True)
    t.start()
    return t


def _supports(param: str) -> bool:
    try:
        return param in inspect.signature(jax.distributed.initialize).parameters
    except (TypeError, ValueError):
        return False


def _jax_initialize(timeout_s: float, heartbeat_timeout_s: int | None = None, **kwargs) -> None:
    if heartbeat_timeout_s is not None and _supports("heartbeat_timeout_seconds"):
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
    if _supports("initialization_timeout"):
        kwargs["initialization_timeout"] = max(1, int(round(timeout_s)))
    if "cluster_detection_method" in kwargs and not _supports("cluster_detection_method"):
        kwargs.pop("cluster_detection_method")
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before any JAX calls" in str(e) or "backend" in str(e).lower():
            raise RuntimeError(
                "runtime.initialize() must run before jax initialises its backends (before any "
                f"computation, jax.devices(), device_put, ...): {e}"
            ) from None
        raise


def current_info(source: str = "single") -> RuntimeInfo:
    """RuntimeInfo of the running process (initialises jax's backends)."""
    address = None
    if jax.distributed.is_initialized():
        from jax._src import distributed as _dist

        address = getattr(_dist.global_state, "coordinator_address", None)
    return RuntimeInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        global_device_count=jax.device_count(),
        platform=jax.default_backend(),
        coordinator_address=address,
        source=source,
    )


def _given_or_env(coordinator_address, num_processes, process_id) -> tuple[dict, str]:
    """The explicit arguments (all three or none), else the ``DISTRIBUTED_*`` environment."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError("coordinator_address, num_processes and process_id must be given "
                             "together; missing: " + ", ".join(missing))
        return given, "explicit"
    env_names = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
                 "process_id": ENV_PROCESS_ID}
    env_vals = {k: os.environ.get(v) or None for k, v in env_names.items()}
    if all(v is None for v in env_vals.values()):
        return given, "explicit"
    missing = [env_names[k] for k, v in env_vals.items() if v is None]
    if missing:
        raise ValueError(
            "multi-process environment is incomplete: missing " + ", ".join(missing)
            + f" (set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    return env_vals, "env"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float = 300,
    platform: str | None = None,
    local_device_ids: list[int] | None = None,
    heartbeat_timeout_s: int | None = None,
) -> RuntimeInfo:
    """Join the other processes of this job (or run single-process) and describe this process.

    See the module docstring for the detection order. ``platform`` ("cpu", "gpu", "tpu") pins
    ``jax_platforms``. On CPU (or an unspecified platform) the gloo CPU collectives are selected
    before ``jax.distributed.initialize`` so cross-process collectives work. Idempotent: a second
    call returns the current info. Raises ValueError for partial arguments, CoordinatorError when
    the coordinator cannot be reached within ``timeout_s`` seconds. ``heartbeat_timeout_s``
    (jax default 100 s) bounds how long survivors wait before aborting when a peer dies;
    ``local_device_ids`` restricts the GPUs this process uses.
    """
    if jax.distributed.is_initialized():
        return current_info("already initialised")

    given, source = _given_or_env(coordinator_address, num_processes, process_id)
    if platform:
        jax.config.update("jax_platforms", platform)
    eff_platform = _effective_platform(platform)

    if source == "explicit" and given["coordinator_address"] is None:
        if slurm_detected():
            address, num, pid, ids = slurm_params(eff_platform)
            given = {"coordinator_address": address, "num_processes": num, "process_id": pid}
            if local_device_ids is None:
                local_device_ids = ids
            source = "slurm"
        else:
            source = _jax_cluster_detected() or "single"

    if source in ("single",):
        return current_info(source)

    # CPU collectives across processes need gloo (jax 0.10 defaults to it; older ones did not).
    if (
        eff_platform in (None, "cpu")
        and getattr(jax.config, "jax_cpu_collectives_implementation", None) != "mpi"
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    if source in ("tpu", "ompi"):
        _jax_initialize(timeout_s, heartbeat_timeout_s)
        return current_info(source)

    address = str(given["coordinator_address"])
    num = parse_int(given["num_processes"], "num_processes")
    pid = parse_int(given["process_id"], "process_id")
    if num < 1 or not 0 <= pid < num:
        raise ValueError(
            f"need 0 <= process_id < num_processes, got process_id={pid}, num_processes={num}"
        )
    _, port = _split_address(address)
    if pid == 0:
        _check_port_free(port, address)
    else:
        _wait_reachable(address, timeout_s, pid, num)
    done = threading.Event()
    _watchdog(done, address, timeout_s, pid, num)
    try:
        _jax_initialize(
            timeout_s,
            heartbeat_timeout_s,
            coordinator_address=address,
            num_processes=num,
            process_id=pid,
            local_device_ids=local_device_ids,
            cluster_detection_method="deactivate",
        )
    finally:
        done.set()
    return current_info(source)


# --------------------------------------------------------------------------- checks, misc


def shutdown() -> None:
    """Leave ``jax.distributed`` (no-op when it was never started). Blocks until all processes
    call it (up to jax's shutdown timeout)."""
    global _SOURCE
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
