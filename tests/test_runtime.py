"""distributed.runtime: argument checks, single-process info, device checks, coordinator errors."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from distributed import runtime
from distributed.runtime import slurm

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_VARS = (
    "SLURM_JOB_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_NTASKS",
    "OMPI_MCA_orte_hnp_uri",
    runtime.ENV_COORDINATOR,
    runtime.ENV_NUM_PROCESSES,
    runtime.ENV_PROCESS_ID,
)


@pytest.fixture
def no_cluster_env(monkeypatch):
    for k in CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def run_py(code: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    full_env.update({k: str(v) for k, v in env.items()})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "kwargs, missing",
    [
        ({"coordinator_address": "127.0.0.1:1234"}, "num_processes, process_id"),
        ({"num_processes": 2, "process_id": 0}, "coordinator_address"),
        ({"coordinator_address": "h:1", "num_processes": 2}, "process_id"),
    ],
)
def test_partial_arguments_raise(kwargs, missing, no_cluster_env):
    with pytest.raises(ValueError, match=f"missing: {missing}"):
        runtime.initialize(**kwargs)


def test_partial_env_raises(monkeypatch, no_cluster_env):
    monkeypatch.setenv(runtime.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.setenv(runtime.ENV_PROCESS_ID, "0")
    with pytest.raises(ValueError, match=runtime.ENV_NUM_PROCESSES):
        runtime.initialize()


def test_single_process_info(monkeypatch, no_cluster_env):
    # SLURM allocation with a single task: still single-process, no jax.distributed.
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    info = runtime.initialize()
    assert info == runtime.RuntimeInfo(
        process_index=0,
        process_count=1,
        local_device_count=8,
        global_device_count=8,
        platform="cpu",
        coordinator_address=None,
        source="single",
    )
    assert not jax.distributed.is_initialized()
    line = info.log_line()
    assert "process 0/1" in line and "global_devices=8" in line and "\n" not in line
    with pytest.raises(dataclasses_frozen_error()):
        info.process_index = 3  # frozen
    runtime.shutdown()  # no-op


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_check_devices():
    devs = np.array(jax.devices())
    runtime.check_devices(Mesh(devs.reshape(2, 4), ("data", "fsdp")))
    with pytest.raises(ValueError, match=r"unused device ids \[7\]"):
        runtime.check_devices(Mesh(devs[:7].reshape(7, 1), ("data", "fsdp")))
    dup = devs.copy()
    dup[7] = dup[0]
    with pytest.raises(ValueError, match="more than once"):
        runtime.check_devices(Mesh(dup.reshape(4, 2), ("data", "fsdp")))


def test_configure_host_devices_after_init():
    runtime.configure_host_devices(8)  # what conftest set: no-op
    with pytest.raises(RuntimeError, match="already initialised with 8"):
        runtime.configure_host_devices(4)


def test_configure_host_devices_fresh_process():
    r = run_py(
        """
        import os
        from distributed import runtime
        runtime.configure_host_devices(None)   # from DISTRIBUTED_HOST_DEVICES
        import jax
        print(jax.local_device_count(), os.environ["XLA_FLAGS"])
        """,
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false",
        DISTRIBUTED_HOST_DEVICES=3,
    )
    assert r.returncode == 0, r.stderr
    n, flags = r.stdout.split(" ", 1)
    assert n == "3"
    assert flags.split() == [
        "--xla_cpu_enable_fast_math=false",
        "--xla_force_host_platform_device_count=3",
    ]


def test_slurm_helpers(monkeypatch):
    first = slurm._first_slurm_host
    assert first("node7") == "node7"
    assert first("a1,b2") == "a1"
    assert first("gpu[003-010],x") == "gpu003"
    assert first("gpu[012,015-020]") == "gpu012"
    env = {
        "SLURM_JOB_ID": "4097",
        "SLURM_STEP_NODELIST": "n[01-02]",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(runtime.ENV_SLURM_DEVICES, raising=False)
    # one process per GPU: sees GPU SLURM_LOCALID
    assert slurm.slurm_params("gpu") == ("n01:61441", 8, 5, [1])
    assert slurm.slurm_params("cpu") == ("n01:61441", 8, 5, None)
    # SLURM bound one GPU to the task (--gpus-per-task=1): use it as is
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert slurm.slurm_params("gpu")[3] is None
    # one process per node: all GPUs of the node
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x8)")
    assert slurm.slurm_params("gpu")[3] is None
    monkeypatch.setenv(runtime.ENV_SLURM_DEVICES, "localid")
    assert slurm.slurm_params("gpu")[3] == [1]
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "5555")
    assert slurm.slurm_params("gpu")[0] == "n01:5555"


def test_unreachable_coordinator_is_a_clear_error():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    r = run_py(
        f"""
        from distributed import runtime
        runtime.initialize({address!r}, 2, 1, timeout_s=5)
        """,
    )
    took = time.monotonic() - t0
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("distributed.runtime.process.CoordinatorError")
    assert address in last and "within 5 s" in last
    assert took < 40


def test_busy_coordinator_port_is_a_clear_error():
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_py(
            f"""
            from distributed import runtime
            runtime.initialize("127.0.0.1:{port}", 2, 0, timeout_s=5)
            """,
        )
    assert r.returncode != 0
    assert f"port {port} on this host is already in use" in r.stderr


def test_missing_peer_ends_with_one_clear_line():
    """Process 0 of 2 alone: jax would abort (SIGABRT); the watchdog exits cleanly first."""
    address = f"127.0.0.1:{free_port()}"
    r = run_py(
        f"""
        from distributed import runtime
        runtime.initialize({address!r}, 2, 0, timeout_s=2)
        """,
    )
    assert r.returncode == runtime.exit_codes.STALLED, (r.returncode, r.stderr[-2000:])
    assert f"did not start within 2 s (coordinator {address})" in r.stderr


def test_check_devices_unequal_local_counts():
    """Two processes with 2 and 3 devices: the mesh covers all 5, but the counts differ."""
    code = textwrap.dedent(
        """
        import os
        import numpy as np
        from distributed import runtime
        runtime.configure_host_devices(2 + int(os.environ["DISTRIBUTED_PROCESS_ID"]))
        runtime.initialize(timeout_s=60)
        import jax
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        try:
            runtime.check_devices(mesh)
        except ValueError as e:
            print("CHECK", e)
            raise SystemExit(0)
        print("CHECK passed")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "local.py"),
            "--processes=2",
            "--",
            sys.executable,
            "-c",
            code,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for i in (0, 1):
        assert f"[p{i}] CHECK processes have different local device counts {{0: 2, 1: 3}}" in (
            r.stdout
        ), r.stdout


def test_enable_compile_cache(tmp_path):
    r = run_py(
        f"""
        import jax, jax.numpy as jnp
        from distributed import runtime
        runtime.enable_compile_cache({str(tmp_path / "cache")!r}, min_compile_time_s=0)
        print(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).sum())
        """
    )
    assert r.returncode == 0, r.stderr
    assert any((tmp_path / "cache").iterdir())
