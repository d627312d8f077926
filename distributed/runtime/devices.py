"""Devices of this process: simulated CPU devices, checks that a mesh uses every device once,
and jax's persistent compilation cache."""

from __future__ import annotations

import collections
import os
import re

import jax

from .slurm import parse_int

ENV_HOST_DEVICES = "DISTRIBUTED_HOST_DEVICES"
_COUNT_FLAG = "--xla_force_host_platform_device_count"


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
        n = parse_int(env, ENV_HOST_DEVICES)
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
