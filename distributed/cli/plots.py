"""The report's figures (`distributed.cli.report`): one function per PNG, each drawing a run's
records onto a matplotlib ``Figure`` (no pyplot: no global state, no GUI backend).

Every axis over steps shades the BCD phases (when there are several), draws their boundaries
(``gid="phase_boundary"``), marks checkpoint saves (``gid="checkpoint"``, triangles on the step
axis) and resumes (``gid="resume"``, red dashed lines); series carry ``gid``s too, so tests can
find them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .records import (
    ReportError,
    Run,
    fmt,
    gapped,
    held_out_metrics,
    members,
    number,
    phases,
    series,
    unit,
    validation_groups,
)

SHADES = ("tab:green", "tab:orange", "tab:purple", "tab:olive", "tab:cyan", "tab:brown")
LINES = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown")


def _log_if_positive(ax, values: Sequence[float], min_ratio: float = 1.0) -> None:
    vals = [v for v in values if not math.isnan(v)]
    if vals and min(vals) > 0 and max(vals) / min(vals) >= min_ratio:
        ax.set_yscale("log")


def decorate(ax, run: Run, names: bool = False) -> None:
    """Shade the phases, draw phase boundaries, mark checkpoint saves and resumes."""
    spans = phases(run)
    colours: dict[str, str] = {}
    for name, a, b in spans if len(spans) > 1 else ():  # one phase: nothing to tell apart
        colours.setdefault(name, SHADES[len(colours) % len(SHADES)])
        ax.axvspan(a, b, color=colours[name], alpha=0.10, lw=0, gid="phase")
        if names:
            ax.text((a + b) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center",
                    va="bottom", fontsize=8, color=colours[name], fontweight="bold")
    for i, (_, _, b) in enumerate(spans[:-1]):
        ax.axvline(b, color="0.4", lw=1, gid="phase_boundary",
                   label="phase boundary" if names and i == 0 else None)
    if run.saves:
        ax.plot(run.saves, [0.0] * len(run.saves), ls="none", marker="^", ms=8, color="0.25",
                transform=ax.get_xaxis_transform(), clip_on=False, zorder=5, gid="checkpoint",
                label="checkpoint saved" if names else None)
    for i, s in enumerate(run.resumes):
        ax.axvline(s, color="tab:red", ls="--", lw=1.2, gid="resume",
                   label="resumed" if names and i == 0 else None)
    end = max(b for _, _, b in spans) if spans else 1
    ax.set_xlim(0, end * 1.015 + 0.5)
    ax.grid(True, which="major", alpha=0.3)


def _points_and_mean(ax, run: Run, key: str, colour: str, what: str, cut: bool = False
                     ) -> list[float]:
    """Per-step points of ``key`` and the line of its epoch means ``train_<key>`` (``cut``:
    broken between phases, e.g. a norm of another block's gradient)."""
    xs, ys = series(run.steps, key)
    ex, ey = series(run.epochs, f"train_{key}")
    if cut:
        ends = {b for _, _, b in phases(run)[:-1]}
        cuts = [i for i in range(1, len(ex)) if any(ex[i - 1] <= b < ex[i] for b in ends)]
        for i in reversed(cuts):
            ex.insert(i, ex[i - 1])
            ey.insert(i, math.nan)
    if xs:
        ax.plot(xs, ys, "o", ms=3.5, color=colour, alpha=0.45, gid=f"{key}:steps",
                label=f"{what} at logged steps")
    if ex:
        ax.plot(ex, ey, "-", lw=1.8, color=colour, gid=f"{key}:epoch_mean",
                label=f"{what}, epoch mean")
    return ys + ey


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_loss(fig, run: Run) -> None:
    ax = fig.subplots()
    values = _points_and_mean(ax, run, "loss", "tab:blue", "train loss")
    vx, vy = series(run.epochs, "val_loss")
    if vx:
        ax.plot(vx, vy, "--", lw=1.8, color="black", gid="val_loss", label="validation loss")
    if not values + vy:
        return _empty(ax, "no loss records")
    _log_if_positive(ax, values + vy)
    decorate(ax, run, names=True)
    ax.set(xlabel="step", ylabel=unit(run, "loss", "\n"))
    shaded = "; shaded: BCD phases" if len(phases(run)) > 1 else ""
    ax.set_title(f"Training and validation loss (log scale{shaded})", pad=16)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_optimizer(fig, run: Run) -> None:
    axes = fig.subplots(3, 1, sharex=True)
    blocks = sorted({k[3:] for r in run.steps for k in r if k.startswith("lr_")}
                    | {k[9:] for r in run.epochs for k in r if k.startswith("train_lr_")})
    keys = [(f"lr_{b}", f"train_lr_{b}", f"{b} block") for b in blocks] or [
        ("lr", "train_lr", "learning rate")]
    lrs: list[float] = []
    for i, (sk, ek, label) in enumerate(keys):
        xs, ys = gapped(run, sk, ek)
        axes[0].plot(xs, ys, "-o", ms=2.5, lw=2, color=LINES[i % len(LINES)], gid=sk,
                     label=label if len(keys) > 1 else "learning rate")
        lrs += ys
    _log_if_positive(axes[0], lrs, min_ratio=10.0)
    if axes[0].get_yscale() == "linear":
        axes[0].set_ylim(0, max([v for v in lrs if not math.isnan(v)], default=1.0) * 1.2)
    axes[0].set(ylabel="learning rate")
    axes[0].set_title("Learning rate per BCD block (no line: block frozen)" if len(keys) > 1
                      else "Learning rate", pad=16)
    for ax, key, colour in ((axes[1], "grad_norm", "tab:purple"),
                            (axes[2], "update_norm", "tab:brown")):
        _log_if_positive(ax, _points_and_mean(ax, run, key, colour, key, cut=True))
        ax.set(ylabel=unit(run, key, "\n"))
    for ax in axes:
        decorate(ax, run, names=ax is axes[0])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xlabel("step")


def plot_validation(fig, run: Run) -> None:
    groups = validation_groups(run)
    if not groups:
        return _empty(fig.subplots(), "no validation records")
    axes = fig.subplots(len(groups), 1, sharex=True, squeeze=False)[:, 0]
    for ax, group in zip(axes, groups, strict=True):
        xs, ys = series(run.epochs, group[0])
        ax.plot(xs, ys, "-o", ms=3, color="black", gid=group[0])
        _log_if_positive(ax, ys)
        decorate(ax, run, names=ax is axes[0])
        same = f" (= {', '.join(group[1:])}: identical)" if len(group) > 1 else ""
        ax.set_ylabel(group[0])
        ax.set_title(f"{unit(run, group[0])}{same}, per epoch", fontsize=10,
                     pad=16 if ax is axes[0] else 6)
    axes[-1].set_xlabel("step")


def plot_members(fig, run: Run) -> None:
    """Each ensemble member's epoch-mean training loss (solid) and validation loss (dashed)."""
    ax = fig.subplots()
    values: list[float] = []
    best = run.summary.get("best_member")
    for i in members(run):
        colour = f"C{i % 10}"
        for key, style, what in ((f"train_loss_member{i}", "-", "train"),
                                 (f"val_loss_member{i}", "--", "validation")):
            xs, ys = series(run.epochs, key)
            if xs:
                star = " (best)" if i == best and what == "validation" else ""
                ax.plot(xs, ys, style, lw=2.2 if i == best else 1.4, color=colour, gid=key,
                        label=f"member {i} {what}{star}")
                values += ys
    if not values:
        return _empty(ax, "no per-member records")
    _log_if_positive(ax, values)
    decorate(ax, run, names=True)
    ax.set(xlabel="step", ylabel=unit(run, "loss", "\n"))
    ax.set_title("Ensemble members: epoch-mean training loss (solid), validation loss (dashed)",
                 pad=16)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_test(fig, run: Run) -> None:
    names = held_out_metrics(run)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=True):
        after = float(run.summary[f"test_{name}"])
        before = number(run.summary.get(f"initial_test_{name}"))
        labels, values = (["untrained", "trained"], [before, after]) if before is not None \
            else (["trained"], [after])
        bars = ax.bar(labels, values, color=["0.6", "tab:blue"][-len(values):], gid=name)
        ax.bar_label(bars, fmt="%.3g")
        _log_if_positive(ax, values)
        ax.margins(y=0.15)
        better = f": {before / after:.3g}× lower" if before and after > 0 else ""
        ax.set(title=f"held-out {name}{better}", ylabel=unit(run, name, "\n"))
    fig.suptitle("Held-out test set: trained model vs the untrained model")


def plot_throughput(fig, run: Run) -> None:
    ax, bx = fig.subplots(2, 1, height_ratios=(3, 1.3))
    xs, ys = series(run.steps, "samples_per_sec")
    if xs:
        ax.plot(xs, ys, "-o", ms=3, color="tab:blue", gid="samples_per_sec")
        decorate(ax, run, names=True)
        ax.set(xlabel="step", ylabel="samples / s")
        ax.set_title("Throughput between logged steps", pad=16)
        ax.set_ylim(bottom=0)
    else:
        _empty(ax, "no samples_per_sec records")
    ledger = run.summary.get("goodput") if isinstance(run.summary.get("goodput"), dict) else {}
    parts = {k[:-2]: v for k, v in ledger.items() if k.endswith("_s") and number(v)
             and k not in ("wall_s", "lost_s_on_restart")}
    if not parts:
        return _empty(bx, "no goodput ledger (summary.json is written when the run ends)")
    left = 0.0
    for i, (k, v) in enumerate(sorted(parts.items(), key=lambda kv: -kv[1])):
        bx.barh([0], [v], left=left, color=f"C{i}", label=f"{k} {v:.3g} s", gid=f"wall:{k}")
        left += v
    resumed = number(ledger.get("resumed_from_step"))
    attempt = f" since the resume from step {resumed:.0f}" if resumed is not None else ""
    bx.set(yticks=[], xlabel="seconds", title=f"Where the wall time went{attempt} "
           f"(goodput = step time / wall time = {fmt(ledger.get('goodput'))})")
    bx.legend(fontsize=7, ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.45))


FIGURES = {"loss.png": (plot_loss, (10, 5)), "optimizer.png": (plot_optimizer, (10, 8)),
           "validation.png": (plot_validation, (10, 3.4)), "test.png": (plot_test, (9, 4)),
           "members.png": (plot_members, (10, 5)),
           "throughput.png": (plot_throughput, (10, 6))}


def make_figures(run: Run) -> dict[str, Any]:
    """``{file name: matplotlib Figure}``; ``test.png`` only when summary.json has test metrics,
    ``members.png`` only for an ensemble (per-member records).

    Raises:
        ReportError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("matplotlib is not installed and the report draws with it; "
                          "pip install matplotlib (or the [report] extra: "
                          "pip install 'jax-bcd-distributed[report]')") from None
    out = {}
    for name, (draw, (w, h)) in FIGURES.items():
        if name == "test.png" and not held_out_metrics(run):
            continue
        if name == "members.png" and not members(run):
            continue
        if name == "validation.png":
            h *= max(1, len(validation_groups(run)))
        fig = Figure(figsize=(w, h), layout="constrained")
        draw(fig, run)
        out[name] = fig
    return out
