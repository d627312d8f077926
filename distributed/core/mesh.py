"""Device meshes with `data`, `fsdp` and `tensor` axes (and `ensemble`), and logical-to-mesh
axis rules.

A mesh is described by a mapping of axis name to size, e.g. ``{"data": -1, "fsdp": 2}`` or the
string form ``"data:-1,fsdp:2,tensor:1"``; ``-1`` takes the devices the other axes leave over.
The mesh always has the three axes, in the order ``(data, fsdp, tensor)``, so shardings written
against axis names work on every mesh. A spec that names ``ensemble`` (the members of an
ensemble, `distributed.core.ensemble`) gets that axis too, after ``data``:
``(data, ensemble, fsdp, tensor)`` (``data`` stays outermost, so multi-process meshes keep each
process's devices contiguous along it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
ENSEMBLE = "ensemble"
MESH_AXES = (DATA, FSDP, TENSOR)
# Every axis a mesh may have, in mesh order; `ensemble` only when the spec names it.
ALL_AXES = (DATA, ENSEMBLE, FSDP, TENSOR)

# The mesh axes the global batch is split over.
BATCH_AXES = (DATA, FSDP)

# Logical axis name -> mesh axis (or axes). Parameters and activations name their dimensions
# logically; these rules say which mesh axis each logical dimension is split over.
DEFAULT_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": FSDP,
    "mlp": TENSOR,
    "heads": TENSOR,
    "kv": None,
    "vocab": TENSOR,
    "layers": None,
}


def parse_mesh_axes(axes: str | Mapping[str, int]) -> dict[str, int]:
    """Parse ``"data:-1,fsdp:2"`` (or pass a mapping through) into ``{axis: size}``.

    Raises:
        ValueError: unknown axis names, malformed entries, sizes that are zero or below -1,
            more than one ``-1``.
    """
    if isinstance(axes, str):
        parsed: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in axes.split(","))):
            name, sep, size = item.partition(":")
            name = name.strip()
            if not sep:
                raise ValueError(
                    f"mesh entry {item!r} is not of the form axis:size; write e.g. "
                    f"'data:-1,fsdp:2,tensor:1'."
                )
            if name in parsed:
                raise ValueError(f"mesh axis {name!r} is given twice in {axes!r}.")
            try:
                parsed[name] = int(size)
            except ValueError:
                raise ValueError(
                    f"mesh axis {name!r} has size {size.strip()!r}, which is not an integer; "
                    f"use a positive integer or -1 (the remaining devices)."
                ) from None
        axes = parsed
    else:
        axes = dict(axes)
    unknown = [a for a in axes if a not in ALL_AXES]
    if unknown:
        raise ValueError(
            f"unknown mesh axis name(s) {unknown}; the valid axes are {list(ALL_AXES)}."
        )
    for name, size in axes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes must be integers.")
        if size == 0 or size < -1:
            raise ValueError(
                f"mesh axis {name!r} has size {size}; sizes must be positive, or -1 for "
                f"'the remaining devices'."
            )
    wildcards = [a for a, s in axes.items() if s == -1]
    if len(wildcards) > 1:
        raise ValueError(
            f"mesh axes {wildcards} are all -1; at most one axis may take the remaining devices."
        )
    return {a: int(s) for a, s in axes.items()}


def resolve_mesh_shape(axes: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Sizes of ``(data, fsdp, tensor)`` for ``num_devices`` devices, ``-1`` resolved.

    Missing axes have size 1; ``ensemble`` is included (after ``data``) only when named.
    Without a ``-1`` the sizes must multiply to ``num_devices`` exactly, so that every device
    is used once.

    Raises:
        ValueError: the sizes do not fit ``num_devices``, naming both.
    """
    sizes = parse_mesh_axes(axes)
    full = {a: sizes.get(a, 1) for a in ALL_AXES if a in MESH_AXES or a in sizes}
    fixed = math.prod(s for s in full.values() if s != -1)
    spec = ",".join(f"{a}:{s}" for a, s in full.items())
    if -1 in full.values():
        if num_devices % fixed:
            raise ValueError(
                f"mesh {spec} does not fit {num_devices} devices: the fixed axes use {fixed}, "
                f"which does not divide {num_devices}. Choose sizes whose product divides "
                f"the device count."
            )
        full = {a: (num_devices // fixed if s == -1 else s) for a, s in full.items()}
    elif fixed != num_devices:
        raise ValueError(
            f"mesh {spec} needs {fixed} devices but {num_devices} are available; make the "
            f"sizes multiply to {num_devices}, or set one axis to -1."
        )
    return full


def make_mesh(
    axes: str | Mapping[str, int] = "data:-1", devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Build a `jax.sharding.Mesh` with axes ``("data", "fsdp", "tensor")`` (and ``"ensemble"``
    after ``"data"`` when ``axes`` names it).

    Args:
        axes: axis sizes, as a mapping or the string ``"data:-1,fsdp:2,tensor:1"``. Missing axes
            have size 1; one axis may be ``-1`` (the remaining devices).
        devices: the devices to use (default: all global devices, ``jax.devices()``).

    Returns:
        A mesh using every given device exactly once. On real hardware the device order comes
        from `jax.experimental.mesh_utils` so that the fastest links carry the tensor and fsdp
        collectives; multi-process meshes keep each process's devices contiguous along `data`.

    Raises:
        ValueError: a malformed spec or sizes that do not fit the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(axes, len(devices))
    dims = tuple(shape.values())
    device_array = _device_array(devices, dims)
    return Mesh(device_array, tuple(shape))


def _device_array(devices: list[jax.Device], dims: tuple[int, ...]) -> np.ndarray:
    if devices and devices[0].platform in ("tpu", "gpu", "cuda", "rocm"):
        from jax.experimental import mesh_utils

        try:
            if len({d.process_index for d in devices}) > 1:
                per_host = len(devices) // len({d.process_index for d in devices})
                if dims[0] % (len(devices) // per_host) == 0:
                    dcn = (len(devices) // per_host,) + (1,) * (len(dims) - 1)
                    ici = (dims[0] // dcn[0], *dims[1:])
                    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
            return mesh_utils.create_device_mesh(dims, devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # unusual topologies: fall back to the plain order below.
    # Sort by (process, id) so each process's devices are contiguous along the leading axis.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return np.array(ordered, dtype=object).reshape(dims)


def batch_shard_count(mesh: Mesh) -> int:
    """Number of shards the global batch is split into (product of the batch axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def check_batch_size(
    global_batch_size: int,
    mesh: Mesh | None = None,
    process_count: int = 1,
    *,
    num_examples: int | None = None,
) -> None:
    """Check that a global batch splits over the mesh's batch shards and the processes.

    Args:
        global_batch_size: examples per step over all processes.
        mesh: its batch axes (`BATCH_AXES`) must divide the batch (``None``: not checked).
        process_count: processes sharing the batch; each reads ``global_batch_size / count``.
        num_examples: the data set's size; a batch larger than it is refused.

    Raises:
        ValueError: naming the batch size, what it must divide or fit, and a value that works.
    """
    b = global_batch_size
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0:
        raise ValueError(f"batch_size={b!r} must be a positive integer.")
    if mesh is not None:
        shards = batch_shard_count(mesh)
        if b % shards:
            sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES if a in mesh.shape)
            raise ValueError(
                f"batch_size={b} is not divisible by the {shards} batch shards of the mesh "
                f"({sizes}); use a multiple of {shards}, e.g. "
                f"{shards * max(1, round(b / shards))}."
            )
    if b % process_count:
        raise ValueError(f"batch_size={b} is not divisible by the {process_count} processes; "
                         f"use a multiple of {process_count}.")
    if num_examples is not None and b > num_examples:
        raise ValueError(f"global batch size {b} is larger than the dataset ({num_examples} "
                         f"examples); use a batch size of at most {num_examples}.")


def logical_to_mesh(
    logical_axes: Sequence[str | None], rules: Mapping[str, str | tuple[str, ...] | None] = None
) -> tuple[str | tuple[str, ...] | None, ...]:
    """Map logical dimension names (e.g. ``("embed", "mlp")``) to mesh axes via ``rules``.

    A mesh axis is used at most once per array: a later dimension asking for an axis already
    taken is left unsharded.

    Raises:
        ValueError: a logical name with no rule, naming it and the known names.
    """
    rules = DEFAULT_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f"logical axis {name!r} has no rule; known logical axes: {sorted(rules)}."
            )
        target = rules[name]
        members = (target,) if isinstance(target, str) else tuple(target or ())
        if any(m in used for m in members):
            out.append(None)
            continue
        used.update(members)
        out.append(target)
    return tuple(out)
