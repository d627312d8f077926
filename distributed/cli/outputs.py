"""What a run writes besides checkpoints: metric records (``metrics.jsonl``, TensorBoard,
MLflow), ``summary.json`` and the exported ``model.eqx``."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import make_metadata, save_checkpoint
from ..core import bcd
from ..core.clock import EpochClock
from ..core.ensemble import member, member_key
from ..loop.writers import JsonlWriter, MLflowWriter, MultiWriter, TensorBoardWriter
from .config import TrainConfig

log = logging.getLogger(__name__)


class RunWriter:
    """Every record of a run into ``metrics.jsonl`` (and TensorBoard event files, and an MLflow
    run, when asked), with the BCD phase name and a single ``lr`` (the first block's) added.

    The MLflow run gets the config as parameters at the start, every record as metrics, and at
    the end (`finish`) the summary and the artifacts.
    """

    def __init__(self, cfg: TrainConfig, workdir: Path, plan: Sequence[bcd.Phase],
                 clock: EpochClock):
        self.plan, self.clock = tuple(plan), clock
        writers: list[Any] = [JsonlWriter(workdir / "metrics.jsonl")]
        if cfg.tensorboard:
            writers.append(TensorBoardWriter(workdir / "tensorboard"))
        self.mlflow = None
        if cfg.mlflow_uri:
            self.mlflow = MLflowWriter(cfg.mlflow_uri, run_name=workdir.name,
                                       params=cfg.to_dict())
            writers.append(self.mlflow)
        self.writer = MultiWriter(writers)

    def write(self, step: int, metrics: dict) -> None:
        p = bcd.phase_at(self.plan, max(step - 1, 0), self.clock)
        rec = {"phase": self.plan[p].name, **metrics}
        lrs = [v for k, v in metrics.items() if k.startswith("lr_")]
        if lrs and "lr" not in rec:
            rec["lr"] = lrs[0]
        self.writer.write(step, rec)

    def finish(self, summary: dict, artifacts: Sequence[Path], workdir: Path) -> None:
        """The MLflow run's summary and artifacts: ``artifacts``, and the report's PNGs and
        text under ``report/`` (rendered from ``workdir``'s records into a temporary folder;
        skipped with a log line when matplotlib, the ``[report]`` extra, is missing)."""
        if self.mlflow is None:
            return
        self.mlflow.log_summary(summary)
        for path in artifacts:
            if path.exists():
                self.mlflow.log_artifact(path)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.info("MLflow: no report PNGs (matplotlib is not installed: pip install "
                     "'jax-bcd-distributed[report]')")
            return
        from .report import write_report

        with tempfile.TemporaryDirectory() as tmp:
            try:
                out = write_report(workdir, Path(tmp) / "report")
            except Exception as e:  # noqa: BLE001 - the run is done: say it, do not fail it
                log.warning("MLflow: no report PNGs (%s: %s)", type(e).__name__, e)
                return
            for path in sorted(out.iterdir()):
                self.mlflow.log_artifact(path, artifact_path="report")

    def close(self, status: str = "FINISHED") -> None:
        for w in self.writer.writers:
            if w is self.mlflow:
                w.close(status)
            else:
                w.close()


def require_extras(cfg: TrainConfig) -> str | None:
    """One line naming what to install when a flag needs an optional package that is missing."""
    needs = [("tensorboard", "tensorboardX", "tensorboard"), ("mlflow_uri", "mlflow", "mlflow")]
    for flag, module, extra in needs:
        if getattr(cfg, flag):
            try:
                __import__(module)
            except ImportError:
                return (f"--{flag} needs the {module} package, which is not installed; install "
                        f"it with pip install 'jax-bcd-distributed[{extra}]' (or drop --{flag}).")
    return None


# MLflow's own settings for a quick reachability check (retries and timeout of HTTP stores)
_MLFLOW_CHECK_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def check_mlflow(uri: str) -> str | None:
    """One line when the MLflow tracking store at ``uri`` cannot be used (checked before the
    run writes anything), else None."""
    from mlflow import MlflowClient

    saved = {k: os.environ.get(k) for k in _MLFLOW_CHECK_ENV}
    os.environ.update(_MLFLOW_CHECK_ENV)
    local = Path(uri.removeprefix("file://")) if "://" not in uri or uri.startswith("file://") \
        else None  # a file store: the folder MLflow would create
    existed = local is None or local.exists()
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure of the store: one line
        if not existed and local.is_dir() and not local.is_symlink():
            shutil.rmtree(local, ignore_errors=True)  # a refused attempt leaves nothing
        first = next((line.strip() for line in str(e).splitlines() if line.strip()),
                     type(e).__name__)
        return (f"--mlflow_uri={uri}: the MLflow tracking store is not usable ({first[:300]}); "
                f"give a working tracking URI, e.g. sqlite:///runs/mlflow.db or "
                f"http://<host>:5000.")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return None


def test_report(run_task: Any, engine: Any, model: Any) -> dict[str, float]:
    """The held-out numbers of ``model``: against the embedded data's truth (psf), and the
    task's metrics on every row of ``--test_data`` (``test_<metric>``). For an ensemble:
    member ``i``'s as ``<name>_member<i>`` and the mean over the (finite) members as ``<name>``."""
    if getattr(engine, "ensemble", None) is None:
        out = dict(run_task.report(model))
    else:
        out = {}
        for i in range(engine.ensemble.size):
            out.update({member_key(k, i): v for k, v in run_task.report(member(model, i)).items()})
        for k in {k.rsplit("_member", 1)[0] for k in out}:
            vals = [out[member_key(k, i)] for i in range(engine.ensemble.size)]
            ok = [v for v in vals if math.isfinite(v)]
            out[k] = sum(ok) / len(ok) if ok else math.nan
    if run_task.test is not None:
        scores = engine.evaluator_for(run_task.test)(model)
        out.update({f"test_{k}": v for k, v in scores.items()})
    return out


def export(model: Any, path: Path, cfg: TrainConfig, result: Any,
           ensemble: dict | None = None) -> None:
    """The trained model in the single-file format (`distributed.load_model` rebuilds it).
    Call on every process (process 0 writes). ``ensemble``: the header record of an
    ensemble's members (every member is in the file, stacked on a leading axis)."""
    hist = result.history
    meta = make_metadata(
        step=result.final_step, epoch=len(hist.get("train_loss", [])),
        train_loss=(hist.get("train_loss") or [None])[-1],
        val_loss=(hist.get("val_loss") or [None])[-1], config=cfg.to_dict())
    if ensemble is not None:
        meta["ensemble"] = ensemble
    save_checkpoint(model, path, meta)


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
