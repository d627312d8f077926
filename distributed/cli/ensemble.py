"""The command line's ensembles: ``--ensemble=K``, ``--sweep=FIELD:v1,...`` and ``--init_seed``
-> an `Ensemble` for `distributed.engine.build`; the members in ``summary.json`` and in the
exported ``model.eqx``."""

from __future__ import annotations

import math
import re
from typing import Any

from ..core.ensemble import MEMBER_SUFFIX, Ensemble, check_ensemble_mesh, member, member_key
from ..core.fingerprint import params_sha256
from .config import (
    SWEEP_TARGETS,
    TrainConfig,
    ensemble_size,
    init_seed,
    is_ensemble,
    parse_sweep,
)
from .workdir import SetupError

_MEMBER = re.compile(rf"^(.*){MEMBER_SUFFIX}(\d+)$")


def init_seeds(cfg: TrainConfig) -> tuple[int, ...]:
    """Each member's initialisation seed: ``--init_seed + i``; in a ``--sweep`` every member
    starts from ``--init_seed`` (one model, so that only the swept setting differs)."""
    base, k = init_seed(cfg), ensemble_size(cfg)
    return (base,) * k if cfg.sweep else tuple(base + i for i in range(k))


def make_ensemble(cfg: TrainConfig) -> Ensemble | None:
    """The run's members (``None`` for a single model), seeded by `init_seeds`, with the
    ``i``-th ``--sweep`` value set on the blocks that use that field."""
    if not is_ensemble(cfg):
        return None
    hyperparams: dict[str, dict[str, tuple[float, ...]]] = {}
    if cfg.sweep:
        field, values = parse_sweep(cfg)
        for block, name in SWEEP_TARGETS[cfg.model][field]:
            hyperparams.setdefault(block, {})[name] = values
    return Ensemble(init_seeds(cfg), hyperparams)


def check_mesh(cfg: TrainConfig, mesh: Any) -> None:
    """The members must split over the mesh's ``ensemble`` axis.

    Raises:
        SetupError: naming ``--ensemble`` (or the sweep's size) and ``--mesh``, and the fix.
    """
    k = ensemble_size(cfg)
    try:
        check_ensemble_mesh(k, mesh)
    except ValueError as e:
        raise SetupError(f"--ensemble={k} with --mesh={cfg.mesh}: {e}") from None


def hyperparameters(cfg: TrainConfig, i: int) -> dict[str, float]:
    """Member ``i``'s values of the settings ``--sweep`` could change for ``--model``."""
    out = {f: float(getattr(cfg, f)) for f in SWEEP_TARGETS[cfg.model]}
    if cfg.sweep:
        field, values = parse_sweep(cfg)
        out[field] = values[i]
    return out


def split_report(report: dict[str, float]) -> tuple[dict[str, float], dict[int, dict]]:
    """``(ensemble-level numbers, {member: its numbers})`` of a report whose member values are
    named ``<name>_member<i>``."""
    own: dict[str, float] = {}
    members: dict[int, dict] = {}
    for k, v in report.items():
        m = _MEMBER.match(k)
        if m is None:
            own[k] = v
        else:
            members.setdefault(int(m.group(2)), {})[m.group(1)] = v
    return own, members


def member_losses(last: dict[str, Any]) -> dict[str, Any]:
    """The members' latest ``train_loss_member<i>`` / ``val_loss_member<i>`` (for checkpoint
    metadata, so that a run resumed at its end can still report them)."""
    return {k: v for k, v in last.items() if _MEMBER.match(k)
            and k.startswith(("train_loss", "val_loss"))}


def _final(history: dict, saved: dict, key: str) -> float | None:
    values = history.get(key)
    v = values[-1] if values else saved.get(key)
    return None if v is None or not math.isfinite(v) else float(v)


def members_summary(cfg: TrainConfig, model: Any, history: dict, per_member: dict[int, dict],
                    restored: dict | None) -> dict[str, Any]:
    """``{"members": [...], "best_member": i}`` for ``summary.json``: each member's
    ``init_seed``, ``hyperparameters``, ``final_train_loss``, ``final_val_loss``,
    ``params_sha256`` and held-out numbers; the best member has the lowest final validation
    loss (training loss without validation; ``None`` if every member diverged)."""
    saved = ((restored or {}).get("metadata") or {}).get("summary") or {}
    members = []
    for i, seed in enumerate(init_seeds(cfg)):
        members.append({
            "member": i, "init_seed": seed, "hyperparameters": hyperparameters(cfg, i),
            "final_train_loss": _final(history, saved, member_key("train_loss", i)),
            "final_val_loss": _final(history, saved, member_key("val_loss", i)),
            "params_sha256": params_sha256(member(model, i)), **per_member.get(i, {})})
    by = "final_val_loss" if any(m["final_val_loss"] is not None for m in members) \
        else "final_train_loss"
    ranked = [m for m in members if m[by] is not None]
    best = min(ranked, key=lambda m: m[by])["member"] if ranked else None
    return {"members": members, "best_member": best}


def header(cfg: TrainConfig) -> dict[str, Any]:
    """The ``"ensemble"`` record of an exported ensemble's ``model.eqx`` header
    (`distributed.load_model` stacks the rebuilt model ``members`` times)."""
    seeds = init_seeds(cfg)
    return {"members": len(seeds), "init_seeds": list(seeds),
            "hyperparameters": [hyperparameters(cfg, i) for i in range(len(seeds))]}
