"""What a run writes besides checkpoints: metric records (``metrics.jsonl``, TensorBoard) and
``summary.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core import bcd
from ..core.clock import EpochClock
from ..loop.writers import JsonlWriter, MultiWriter, TensorBoardWriter
from .config import TrainConfig


class PhaseWriter:
    """Adds the BCD phase name and a single ``lr`` (the first block's) to every record."""

    def __init__(self, writer: Any, plan: Sequence[bcd.Phase], clock: EpochClock):
        self.writer, self.plan, self.clock = writer, tuple(plan), clock

    def write(self, step: int, metrics: dict) -> None:
        p = bcd.phase_at(self.plan, max(step - 1, 0), self.clock)
        rec = {"phase": self.plan[p].name, **metrics}
        lrs = [v for k, v in metrics.items() if k.startswith("lr_")]
        if lrs and "lr" not in rec:
            rec["lr"] = lrs[0]
        self.writer.write(step, rec)

    def close(self) -> None:
        self.writer.close()


def writers(cfg: TrainConfig, workdir: Path, plan: Sequence[bcd.Phase],
            clock: EpochClock) -> PhaseWriter:
    """``metrics.jsonl``, plus TensorBoard event files in ``workdir/tensorboard`` if asked."""
    jsonl: Any = JsonlWriter(workdir / "metrics.jsonl")
    if cfg.tensorboard:
        jsonl = MultiWriter([jsonl, TensorBoardWriter(workdir / "tensorboard")])
    return PhaseWriter(jsonl, plan, clock)


def summary(*, result: Any, sha: str, wall_s: float, nonfinite: int, mesh: Any,
            process_count: int, device_count: int, report: dict, initial: dict,
            ledger: Any, restored: dict | None) -> dict[str, Any]:
    """The ``summary.json`` record of a finished run.

    Losses are the last epoch's means over its finite steps; a run that resumed at its end
    (nothing left to train) takes them from the checkpoint it restored.
    """
    hist = result.history
    meta = ((restored or {}).get("metadata") or {}).get("summary") or {}
    final_train = hist["train_loss"][-1] if hist.get("train_loss") else meta.get(
        "final_train_loss")
    final_val = hist["val_loss"][-1] if hist.get("val_loss") else meta.get("final_val_loss")
    return {
        "final_step": result.final_step,
        "final_train_loss": final_train,
        "final_val_loss": final_val,
        "params_sha256": sha,
        "resumed_from_step": (restored or {}).get("step", result.resumed_from_step),
        "stopped_by": result.stopped_by,
        "samples_per_sec": result.last_metrics.get("samples_per_sec"),
        "wall_s": round(wall_s, 3),
        "nonfinite_skipped": nonfinite,
        "process_count": process_count,
        "device_count": device_count,
        "mesh": dict(mesh.shape),
        **report,
        **{f"initial_{k}": v for k, v in initial.items()},
        "goodput": ledger.summary(),
    }
