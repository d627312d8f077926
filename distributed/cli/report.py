"""Plots and a text summary of a finished (or running) command-line run.

    python -m distributed.report WORKDIR [--out DIR]

reads ``WORKDIR/metrics.jsonl`` (per-step records: step, phase, loss, lr, grad_norm,
samples_per_sec; validation records: val_* keys) and ``WORKDIR/summary.json`` (optional) and
writes into ``WORKDIR/report/`` (or ``--out``): ``loss.png`` (training loss per step, coloured
by BCD phase, with the validation loss), ``validation.png`` (every val_* metric),
``throughput.png`` (samples/s), ``optimizer.png`` (learning rate and gradient norm) and
``report.txt``. A missing or empty metrics.jsonl ends with exit code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..runtime.exit_codes import USAGE


class ReportError(Exception):
    """Unusable input: reported as one line with exit code 2."""


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def load_records(workdir: str | os.PathLike) -> tuple[list[dict], list[dict], dict]:
    """``(step_records, validation_records, summary)`` of a run folder.

    Step records are those with a ``loss``; validation records those with ``val_*`` keys. A
    resumed run may log a step twice: the last record of each step wins. Lines that are not
    JSON objects (e.g. a line cut by a crash) are skipped.
    """
    workdir = Path(workdir)
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} not found: give the --workdir of a run of "
                          f"`python -m distributed.train`.")
    steps: dict[int, dict] = {}
    vals: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or _number(rec.get("step")) is None:
            continue
        s = int(rec["step"])
        if "loss" in rec:
            steps[s] = rec
        if any(k.startswith("val_") for k in rec):
            vals[s] = rec
    if not steps and not vals:
        raise ReportError(f"{path} holds no metric records (is the run still compiling?).")
    summary: dict = {}
    spath = workdir / "summary.json"
    if spath.is_file():
        try:
            summary = json.loads(spath.read_text(encoding="utf-8"))
        except ValueError:
            summary = {}
    return [steps[s] for s in sorted(steps)], [vals[s] for s in sorted(vals)], summary


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = _number(r.get(key))
        if v is not None:
            xs.append(int(r["step"]))
            ys.append(v)
    return xs, ys


def _phases(records: list[dict]) -> list[tuple[str, int, int]]:
    """Consecutive runs of the same phase: ``(name, first_step, last_step)``."""
    out: list[list] = []
    for r in records:
        name = str(r.get("phase", "train"))
        if out and out[-1][0] == name:
            out[-1][2] = int(r["step"])
        else:
            out.append([name, int(r["step"]), int(r["step"])])
    return [tuple(p) for p in out]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _log_if_positive(ax, values: Sequence[float]) -> None:
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")


def plot_loss(ax, steps: list[dict], vals: list[dict]) -> None:
    colours: dict[str, Any] = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    all_y: list[float] = []
    merged = sorted(steps + vals, key=lambda r: int(r["step"]))
    for name, first, last in _phases(merged):  # shade each phase's span of steps
        colours.setdefault(name, palette[len(colours) % len(palette)])
        ax.axvspan(first - 0.5, last + 0.5, color=colours[name], alpha=0.08, lw=0)
    labelled: set[str] = set()
    for name, first, last in _phases(steps):
        part = [r for r in steps if first <= int(r["step"]) <= last]
        xs, ys = _series(part, "loss")
        ax.plot(xs, ys, "-o", ms=3, color=colours[name],
                label=None if name in labelled else name)
        labelled.add(name)
        all_y += ys
    vx, vy = _series(vals, "val_loss")
    if vx:
        ax.plot(vx, vy, "--s", ms=4, color="black", label="validation")
        all_y += vy
    if not all_y:
        return _empty(ax, "no loss records")
    _log_if_positive(ax, all_y)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss by phase")
    ax.legend()


def _figure(path: Path, draw, rows: int = 1, size=(7, 4)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 1, figsize=(size[0], size[1] * rows), squeeze=False)
    draw([a[0] for a in axes])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the PNGs and report.txt; returns the output folder."""
    steps, vals, summary = load_records(workdir)
    out = Path(out) if out is not None else Path(workdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    val_keys = sorted({k for r in vals for k in r if k.startswith("val_")
                       and _number(r[k]) is not None})

    _figure(out / "loss.png", lambda axes: plot_loss(axes[0], steps, vals))

    def draw_val(axes):
        if not val_keys:
            return _empty(axes[0], "no validation records")
        for ax, key in zip(axes, val_keys, strict=False):
            xs, ys = _series(vals, key)
            ax.plot(xs, ys, "-o", ms=3)
            _log_if_positive(ax, ys)
            ax.set_ylabel(key)
            ax.set_xlabel("step")

    _figure(out / "validation.png", draw_val, rows=max(1, len(val_keys)), size=(7, 2.6))

    def draw_simple(keys, empty):
        def draw(axes):
            for ax, key in zip(axes, keys, strict=False):
                xs, ys = _series(steps, key)
                if not xs:
                    _empty(ax, empty.format(key=key))
                    continue
                ax.plot(xs, ys, "-o", ms=3)
                ax.set_ylabel(key)
                ax.set_xlabel("step")
        return draw

    _figure(out / "throughput.png", draw_simple(["samples_per_sec"], "no {key} records"))
    lr_key = "lr" if any("lr" in r for r in steps) else next(
        (k for r in steps for k in r if k.startswith("lr_")), "lr")
    _figure(out / "optimizer.png", draw_simple([lr_key, "grad_norm"], "no {key} records"),
            rows=2, size=(7, 2.6))
    (out / "report.txt").write_text(summary_text(workdir, steps, vals, summary), "utf-8")
    return out


def _fmt(v: Any) -> str:
    n = _number(v)
    return f"{n:.6g}" if n is not None else str(v)


def summary_text(workdir, steps: list[dict], vals: list[dict], summary: dict) -> str:
    lines = [f"run: {Path(workdir).resolve()}"]
    if steps:
        lines.append(f"steps logged: {len(steps)} (step {steps[0]['step']} .. "
                     f"{steps[-1]['step']})")
    for name, first, last in _phases(steps):
        _, ys = _series([r for r in steps if first <= int(r["step"]) <= last], "loss")
        if ys:
            lines.append(f"phase {name}: steps {first}..{last}, loss {_fmt(ys[0])} -> "
                         f"{_fmt(ys[-1])}")
    vx, vy = _series(vals, "val_loss")
    if vy:
        i = min(range(len(vy)), key=vy.__getitem__)
        lines.append(f"validation loss: final {_fmt(vy[-1])}, best {_fmt(vy[i])} at step {vx[i]}")
    _, tp = _series(steps, "samples_per_sec")
    if tp:
        tp_sorted = sorted(tp)
        lines.append(f"throughput: median {_fmt(tp_sorted[len(tp) // 2])} samples/s, "
                     f"last {_fmt(tp[-1])}")
    if summary:
        lines.append("summary.json:")
        for k in sorted(summary):
            if not isinstance(summary[k], (dict, list)):
                lines.append(f"  {k}: {_fmt(summary[k])}")
        goodput = summary.get("goodput")
        if isinstance(goodput, dict) and "goodput" in goodput:
            lines.append(f"  goodput: {_fmt(goodput['goodput'])}")
    else:
        lines.append("summary.json: absent (the run has not finished)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distributed.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the --workdir of a `python -m distributed.train` run")
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/report)")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.workdir, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return USAGE
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
