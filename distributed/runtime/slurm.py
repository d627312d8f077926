"""SLURM environment parsing: is this an ``srun`` step of several tasks, and what are the
coordinator address, process count, process id and local devices of this task.

JAX's own rule for the coordinator: the first host of ``SLURM_STEP_NODELIST`` on port
``61440 + SLURM_JOB_ID % 4096`` (``JAX_COORDINATOR_PORT`` overrides).
"""

from __future__ import annotations

import os
import re

ENV_SLURM_DEVICES = "DISTRIBUTED_SLURM_DEVICES"
_SLURM_PORT_BASE = 65535 - 2**12 + 1  # 61440, as jax's SlurmCluster


def parse_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


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


def slurm_detected() -> bool:
    env = os.environ
    if not (env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_NODELIST")):
        return False
    try:
        return int(env.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def slurm_params(platform: str | None) -> tuple[str, int, int, list[int] | None]:
    env = os.environ
    port = env.get("JAX_COORDINATOR_PORT") or str(
        int(env["SLURM_JOB_ID"]) % 2**12 + _SLURM_PORT_BASE
    )
    address = f"{_first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}"
    num = parse_int(env["SLURM_NTASKS"], "SLURM_NTASKS")
    pid = parse_int(env.get("SLURM_PROCID"), "SLURM_PROCID")
    local_ids: list[int] | None = None
    mode = env.get(ENV_SLURM_DEVICES, "auto").strip().lower()
    if mode not in ("auto", "all", "localid"):
        raise ValueError(f"{ENV_SLURM_DEVICES} must be auto, all or localid, got {mode!r}")
    if platform != "cpu" and mode != "all":
        per_node = _slurm_tasks_on_this_node()
        visible = env.get("CUDA_VISIBLE_DEVICES") or env.get("ROCR_VISIBLE_DEVICES") or ""
        bound_one = len([v for v in visible.split(",") if v.strip()]) == 1
        if mode == "localid" or (per_node != 1 and not bound_one):
            local_ids = [parse_int(env.get("SLURM_LOCALID"), "SLURM_LOCALID")]
    return address, num, pid, local_ids
