"""Process runtime: ``jax.distributed`` wiring, simulated CPU devices, process info, compile cache.

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
:data:`INIT_TIMEOUT_EXIT_CODE` shortly before jax would abort. Once running, a dead process 0 makes
the others abort within about a second; a dead other process makes process 0 abort only after the
heartbeat timeout (``heartbeat_timeout_s``, jax default 100 s) -- launchers stop the rest sooner.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import os
import re
import socket
import sys
import threading
import time

import jax

ENV_COORDINATOR = "DISTRIBUTED_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DISTRIBUTED_NUM_PROCESSES"
ENV_PROCESS_ID = "DISTRIBUTED_PROCESS_ID"
ENV_HOST_DEVICES = "DISTRIBUTED_HOST_DEVICES"
ENV_SLURM_DEVICES = "DISTRIBUTED_SLURM_DEVICES"

#: Exit code of a process whose ``jax.distributed`` start-up did not complete in time.
INIT_TIMEOUT_EXIT_CODE = 3

_SLURM_PORT_BASE = 65535 - 2**12 + 1  # 61440, as jax's SlurmCluster
_COUNT_FLAG = "--xla_force_host_platform_device_count"


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


# --------------------------------------------------------------------------- devices


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # private API moved: assume not initialised, jax will complain itself
        return False


def configure_host_devices(n: int | None) -> None:
    """Make jax simulate ``n`` CPU devices in this process.

    Must run before jax initialises its backends (before any computation or ``jax.devices()``).
    ``n=None`` uses ``$DISTRIBUTED_HOST_DEVICES`` if set, else leaves jax's setting alone.
    Sets ``XLA_FLAGS=--xla_force_host_platform_device_count=n`` (replacing an existing value) and
    ``jax_num_cpu_devices``. Calling it again with the count already in effect is a no-op.
    """
    if n is None:
        env = os.environ.get(ENV_HOST_DEVICES, "").strip()
        if not env:
            return
        n = _parse_int(env, ENV_HOST_DEVICES)
    n = int(n)
    if n < 1:
        raise ValueError(f"host device count must be >= 1, got {n}")
    if _backends_initialized():
        have = len(jax.local_devices(backend="cpu"))
        if have == n:
            return
        raise RuntimeError(
            f"cannot simulate {n} CPU devices: jax's backends are already initialised with "
            f"{have} CPU device(s). Call configure_host_devices() (or pass --host_devices) before "
            "anything touches jax devices or runs a computation."
        )
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(rf"{_COUNT_FLAG}=\S*", "", flags).split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_COUNT_FLAG}={n}"])
    jax.config.update("jax_num_cpu_devices", n)


# --------------------------------------------------------------------------- initialize


def _parse_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'n1', 'n1,n2', 'n[001-004],m2', 'n[001,007-015]'."""
    i = next((k for k, ch in enumerate(nodelist) if ch in ",["), len(nodelist))
    if i == len(nodelist) or nodelist[i] == ",":
        return nodelist[:i]
    rest = nodelist[i + 1 :]
    j = next((k for k, ch in enumerate(rest) if ch in ",-]"), len(rest))
    return nodelist[:i] + rest[:j]


def _slurm_tasks_on_this_node() -> int | None:
    """Tasks of this step on this node, from SLURM_STEP_TASKS_PER_NODE ('2(x3),1') + NODEID."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    node = os.environ.get("SLURM_NODEID")
    if not spec or node is None:
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node_id = int(node)
    return counts[node_id] if node_id < len(counts) else None


def _slurm_detected() -> bool:
    env = os.environ
    if not (env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_NODELIST")):
        return False
    try:
        return int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def _slurm_params(platform: str | None) -> tuple[str, int, int, list[int] | None]:
    env = os.environ
    port = env.get("JAX_COORDINATOR_PORT") or str(
        int(env["SLURM_JOB_ID"]) % 2**12 + _SLURM_PORT_BASE
    )
    address = f"{_first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}"
    num = _parse_int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    pid = _parse_int(env.get("SLURM_PROCID"), "SLURM_PROCID")
    local_ids: list[int] | None = None
    mode = env.get(ENV_SLURM_DEVICES, "auto").strip().lower()
    if mode not in ("auto", "all", "localid"):
        raise ValueError(f"{ENV_SLURM_DEVICES} must be auto, all or localid, got {mode!r}")
    if platform != "cpu" and mode != "all":
        per_node = _slurm_tasks_on_this_node()
        visible = env.get("CUDA_VISIBLE_DEVICES") or env.get("ROCR_VISIBLE_DEVICES") or ""
        bound_one = len([v for v in visible.split(",") if v.strip()]) == 1
        if mode == "localid" or (per_node != 1 and not bound_one):
            local_ids = [_parse_int(env.get("SLURM_LOCALID"), "SLURM_LOCALID")]
    return address, num, pid, local_ids


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
        os._exit(INIT_TIMEOUT_EXIT_CODE)

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


_SOURCE = "single"


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
    global _SOURCE
    if jax.distributed.is_initialized():
        return current_info(_SOURCE)

    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    source = "explicit"
    if all(v is None for v in given.values()):
        env_names = {
            "coordinator_address": ENV_COORDINATOR,
            "num_processes": ENV_NUM_PROCESSES,
            "process_id": ENV_PROCESS_ID,
        }
        env_vals = {k: os.environ.get(v) or None for k, v in env_names.items()}
        if any(v is not None for v in env_vals.values()):
            missing = [env_names[k] for k, v in env_vals.items() if v is None]
            if missing:
                raise ValueError(
                    "multi-process environment is incomplete: missing "
                    + ", ".join(missing)
                    + f" (set all of {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})"
                )
            given, source = env_vals, "env"
    elif any(v is None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        raise ValueError(
            "coordinator_address, num_processes and process_id must be given together; missing: "
            + ", ".join(missing)
        )

    if platform:
        jax.config.update("jax_platforms", platform)
    eff_platform = _effective_platform(platform)

    if source == "explicit" and given["coordinator_address"] is None:
        if _slurm_detected():
            address, num, pid, ids = _slurm_params(eff_platform)
            given = {"coordinator_address": address, "num_processes": num, "process_id": pid}
            if local_device_ids is None:
                local_device_ids = ids
            source = "slurm"
        else:
            source = _jax_cluster_detected() or "single"

    if source in ("single",):
        _SOURCE = source
        return current_info(source)

    # CPU collectives across processes need gloo (jax 0.10 defaults to it; older ones did not).
    if (
        eff_platform in (None, "cpu")
        and getattr(jax.config, "jax_cpu_collectives_implementation", None) != "mpi"
    ):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    if source in ("tpu", "ompi"):
        _jax_initialize(timeout_s, heartbeat_timeout_s)
        _SOURCE = source
        return current_info(source)

    address = str(given["coordinator_address"])
    num = _parse_int(given["num_processes"], "num_processes")
    pid = _parse_int(given["process_id"], "process_id")
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
    _SOURCE = source
    return current_info(source)


# --------------------------------------------------------------------------- checks, misc


def check_devices(mesh) -> None:
    """Raise ValueError unless ``mesh`` uses every global device exactly once and every process
    has the same number of local devices. Not a collective: any process may call it."""
    import numpy as np

    mesh_ids = [d.id for d in np.asarray(mesh.devices).flat]
    all_ids = sorted(d.id for d in jax.devices())
    dup = sorted(i for i, c in collections.Counter(mesh_ids).items() if c > 1)
    missing = sorted(set(all_ids) - set(mesh_ids))
    unknown = sorted(set(mesh_ids) - set(all_ids))
    if dup or missing or unknown:
        parts = [
            f"the mesh {dict(mesh.shape)} has {len(mesh_ids)} device(s) but there are "
            f"{len(all_ids)} global devices"
        ]
        if missing:
            parts.append(f"unused device ids {missing}")
        if dup:
            parts.append(f"device ids used more than once {dup}")
        if unknown:
            parts.append(f"unknown device ids {unknown}")
        raise ValueError(
            "; ".join(parts) + ". Build the mesh over jax.devices() "
            "(axis sizes must multiply to jax.device_count())."
        )
    # Every device knows its process, so the per-process counts need no collective (and
    # multihost_utils.process_allgather itself assumes equal counts: it fails to reshape).
    per_process = collections.Counter(d.process_index for d in jax.devices())
    if len(set(per_process.values())) > 1:
        raise ValueError(
            "processes have different local device counts "
            f"{dict(sorted(per_process.items()))}; every process must see the same number of "
            "devices (check --devices_per_process / --host_devices / SLURM GPU binding)."
        )


def enable_compile_cache(path: str | os.PathLike, *, min_compile_time_s: float = 1.0) -> None:
    """Turn on jax's persistent compilation cache in ``path`` (created if needed)."""
    path = os.fspath(path)
    if "://" not in path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    except AttributeError:
        pass


def shutdown() -> None:
    """Leave ``jax.distributed`` (no-op when it was never started). Blocks until all processes
    call it (up to jax's shutdown timeout)."""
    global _SOURCE
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    _SOURCE = "single"


__all__ = [
    "ENV_COORDINATOR",
    "ENV_HOST_DEVICES",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_SLURM_DEVICES",
    "INIT_TIMEOUT_EXIT_CODE",
    "CoordinatorError",
    "RuntimeInfo",
    "check_devices",
    "configure_host_devices",
    "current_info",
    "enable_compile_cache",
    "initialize",
    "shutdown",
]
