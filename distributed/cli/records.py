"""A training run's records, read from its workdir for the report (`distributed.cli.report`).

``metrics.jsonl`` holds per-step records (``step``, ``phase``, ``loss``, ``lr_<block>``,
``grad_norm``, ...), per-epoch records (``"event": "epoch"``: ``train_*`` epoch means and
``val_*`` validation) and resume records; ``summary.json`` the final and held-out metrics and
the goodput ledger (with its checkpoint saves); ``config.json`` the run's configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

_PSF_SQ = "mean squared pixel error (PSF normalised to sum 1)"
UNITS = {  # what a metric's number is, per --model (by name without train_/val_/test_)
    "psf": {"loss": _PSF_SQ, "masked_mse": _PSF_SQ,
            "psf_rmse": "PSF pixel RMSE (PSF normalised to sum 1)", "opd_rmse": "OPD RMSE (µm)"},
    "mlp": {"loss": "mean squared error (target units²)",
            "mae": "mean absolute error (target units)", "rmse": "RMSE (target units)"},
    "": {"grad_norm": "L2 norm (active blocks)", "update_norm": "L2 norm (active blocks)",
         "samples_per_sec": "samples / s", "lr": "learning rate"},
}


_MEMBER = re.compile(r"_member(\d+)$")


def members(run: Run) -> list[int]:
    """The ensemble members with per-member epoch records (``train_loss_member<i>``, ...)."""
    found = {int(m.group(1)) for r in run.epochs for k in r
             if (m := _MEMBER.search(k)) and number(r[k]) is not None}
    return sorted(found)


class ReportError(Exception):
    """Unusable input: reported as one line with exit code 2."""


@dataclasses.dataclass
class Run:
    """A run folder's records.

    ``steps``: per-step records, one per step (the last wins: a resumed run may log a step
    twice). ``epochs``: per-epoch records, one per epoch, holding the validation metrics (an
    epoch a run stopped in and resumed from is logged twice: see `_rejoin`). ``resumes``: steps
    the run resumed from. ``saves``: steps with a checkpoint save (``summary.json``'s goodput
    ledger and the steps in ``checkpoints/``). ``summary`` and ``config``: ``{}`` if absent.
    """

    workdir: Path
    steps: list[dict]
    epochs: list[dict]
    resumes: list[int]
    saves: list[int]
    summary: dict
    config: dict

    @property
    def model(self) -> str:
        return str(self.config.get("model", ""))


def number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def load_records(workdir: str | os.PathLike) -> Run:
    """Read a run folder. Lines that are not JSON objects (a line cut by a crash) are skipped.

    Raises:
        ReportError: no ``metrics.jsonl``, or no step or epoch record in it.
    """
    workdir = Path(workdir)
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found: give the --workdir of a run of "
                          f"`python -m distributed.train`.")
    steps: dict[int, dict] = {}
    epochs: dict[Any, dict] = {}
    resumes: list[int] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or number(rec.get("step")) is None:
            continue
        s, event = int(rec["step"]), rec.get("event")
        if event == "resume":
            resumes.append(s)
        elif event == "epoch":
            key = rec["epoch"] if number(rec.get("epoch")) is not None else ("s", s)
            epochs[key] = _rejoin(epochs.get(key), rec, resumes, epochs.get(
                key - 1 if isinstance(key, int) else None))
        elif event is None:
            if "loss" in rec:
                steps[s] = rec
            if any(k.startswith("val_") for k in rec):  # older runs: separate val records
                epochs[("s", s)] = rec
    if not steps and not epochs:
        raise ReportError(f"{path} holds no metric records (is the run still compiling?).")
    summary = _read_json(workdir / "summary.json")
    saves = {int(r["step"]) for r in (summary.get("goodput") or {}).get("saves") or []
             if isinstance(r, dict) and number(r.get("step")) is not None}
    if (workdir / "checkpoints").is_dir():
        saves |= {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}
    return Run(workdir, [steps[s] for s in sorted(steps)],
               sorted(epochs.values(), key=lambda r: int(r["step"])), resumes, sorted(saves),
               summary, _read_json(workdir / "config.json"))


def _rejoin(old: dict | None, new: dict, resumes: list[int], before: dict | None) -> dict:
    """The record of an epoch logged twice. A run stopped mid-epoch at step ``p`` logs the
    epoch's first part; resumed from ``p``, it logs the rest: the two ``train_*`` means are
    joined, weighted by their steps. Otherwise (steps lost to a crash) the last record wins."""
    if old is None or not resumes or resumes[-1] != int(old["step"]) or \
            int(old["step"]) >= int(new["step"]):
        return new
    start = int(before["step"]) if before is not None else 0
    w_old, w_new = int(old["step"]) - start, int(new["step"]) - resumes[-1]
    out = dict(new)
    for k, v in new.items():
        a, b = number(old.get(k)), number(v)
        if k.startswith("train_") and a is not None and b is not None and w_old > 0:
            out[k] = (w_old * a + w_new * b) / (w_old + w_new)
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = number(r.get(key))
        if v is not None:
            xs.append(int(r["step"]))
            ys.append(v)
    return xs, ys


def gapped(run: Run, step_key: str, epoch_key: str) -> tuple[list[int], list[float]]:
    """A series from the step and epoch records, NaN where a record lacks it (a block that is
    inactive in a phase), so that the line breaks there."""
    pts = [(int(r["step"]), number(r.get(step_key))) for r in run.steps]
    pts += [(int(r["step"]), number(r.get(epoch_key))) for r in run.epochs]
    pts.sort(key=lambda p: p[0])
    xs, ys = [], []
    for i, (s, v) in enumerate(pts):  # a stretch starts where the last record was: its phase
        if i and v is not None and pts[i - 1][1] is None:  # began right after that step
            xs.append(pts[i - 1][0])
            ys.append(v)
        xs.append(s)
        ys.append(math.nan if v is None else v)
    return xs, ys


def phases(run: Run) -> list[tuple[str, int, int]]:
    """Consecutive runs of one BCD phase, ``(name, start, end)``: the phase trained steps
    ``start + 1 .. end`` (a record's ``step`` counts the steps done)."""
    out: list[list] = []
    for r in sorted(run.steps + run.epochs, key=lambda r: int(r["step"])):
        name, s = str(r.get("phase", "train")), int(r["step"])
        if out and out[-1][0] == name:
            out[-1][2] = max(out[-1][2], s)
        else:
            out.append([name, out[-1][2] if out else 0, s])
    return [tuple(p) for p in out]


def unit(run: Run, key: str, sep: str = ": ") -> str:
    """Axis label for a metric: its name and what its numbers are (units)."""
    name = key
    for prefix in ("initial_test_", "test_", "train_", "val_"):
        name = name.removeprefix(prefix)
    known = {**UNITS[""], **UNITS.get(run.model, {})}.get(name)
    return f"{key}{sep}{known}" if known else key


def validation_groups(run: Run) -> list[list[str]]:
    """The ``val_*`` metrics, identical series grouped (``[["val_loss", "val_masked_mse"],
    ["val_mae"]]``): one panel each. ``val_loss`` comes first."""
    keys = sorted({k for r in run.epochs for k in r
                   if k.startswith("val_") and number(r[k]) is not None
                   and not _MEMBER.search(k)},
                  key=lambda k: (k != "val_loss", k))
    groups: list[list[str]] = []
    for k in keys:
        xs, ys = series(run.epochs, k)
        for g in groups:
            gx, gy = series(run.epochs, g[0])
            if gx == xs and all(math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
                                for a, b in zip(gy, ys, strict=True)):
                g.append(k)
                break
        else:
            groups.append([k])
    return groups


def held_out_metrics(run: Run) -> list[str]:
    """Names ``X`` with a finite ``test_X`` in summary.json."""
    return sorted(k[5:] for k, v in run.summary.items()
                  if k.startswith("test_") and number(v) is not None)


def fmt(v: Any) -> str:
    n = number(v)
    return f"{n:.4g}" if n is not None else str(v)
