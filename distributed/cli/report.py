"""Plots and a text summary of a finished (or running) command-line run.

    python -m distributed.report WORKDIR [--out DIR]

Reads ``WORKDIR/metrics.jsonl``: per-step records (``step``, ``phase``, ``loss``,
``lr_<block>``, ``grad_norm``, ``update_norm``, ``samples_per_sec``), per-epoch records
(``"event": "epoch"``: the epoch's mean ``train_*`` metrics and its ``val_*`` validation) and
resume records; plus ``summary.json`` and ``config.json`` when present. Writes into
``WORKDIR/report/`` (or ``--out``):

- ``loss.png``: training loss at the logged steps, its per-epoch mean and the validation loss;
- ``optimizer.png``: each BCD block's learning rate, the gradient norm and the update norm;
- ``validation.png``: one panel per distinct validation metric (identical series share one);
- ``test.png``: held-out test metrics of the trained model against the untrained one;
- ``throughput.png``: samples per second, and where the wall time went (goodput ledger);
- ``members.png`` (ensembles): each member's training and validation loss per epoch;
- ``report.txt``: the numbers in words.

Losses and norms are drawn on log axes. Every axis over steps shades the BCD phases, draws their
boundaries (grey lines), marks checkpoint saves (triangles on the step axis) and resumes (red
dashed lines). Units: PSF losses are mean squared pixel errors of PSFs normalised to sum 1, OPD
errors are in micrometres. Exit code 2 and one ``error:`` line for a missing or empty
metrics.jsonl, or when matplotlib is not installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..runtime.exit_codes import USAGE
from .conflicts import check_import_name
from .plots import make_figures
from .records import ReportError as ReportError
from .records import Run as Run
from .records import fmt, held_out_metrics, number, phases, series, unit, validation_groups
from .records import load_records as load_records


def write_report(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the PNGs and report.txt; returns the output folder."""
    run = load_records(workdir)
    figures = make_figures(run)
    out = Path(out) if out is not None else Path(workdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
    (out / "report.txt").write_text(summary_text(run), "utf-8")
    return out


def summary_text(run: Run) -> str:
    """The report in words: phases, epoch-mean losses, validation, test vs untrained, saves."""
    lines = [f"run: {Path(run.workdir).resolve()}"]
    if run.steps:
        lines.append(f"logged steps: {len(run.steps)} (step {run.steps[0]['step']} .. "
                     f"{run.steps[-1]['step']}), epochs: {len(run.epochs)}")
    for name, a, b in phases(run):
        part = [r for r in run.epochs if a < int(r["step"]) <= b]
        _, ys = series(part, "train_loss")
        loss = f", epoch-mean train loss {fmt(ys[0])} -> {fmt(ys[-1])}" if ys else ""
        lines.append(f"phase {name}: steps {a + 1}..{b}{loss}")
    for group in validation_groups(run):
        vx, vy = series(run.epochs, group[0])
        i = min(range(len(vy)), key=vy.__getitem__)
        lines.append(f"{' = '.join(group)}: final {fmt(vy[-1])}, best {fmt(vy[i])} "
                     f"at step {vx[i]}")
    for name in held_out_metrics(run):
        before = run.summary.get(f"initial_test_{name}")
        was = f" (untrained {fmt(before)})" if number(before) is not None else ""
        lines.append(f"held-out {unit(run, name)}: {fmt(run.summary[f'test_{name}'])}{was}")
    for m in run.summary.get("members") or []:
        if isinstance(m, dict):
            best = " (best)" if m.get("member") == run.summary.get("best_member") else ""
            lines.append(f"member {m.get('member')}{best}: init_seed {m.get('init_seed')}, "
                         f"{m.get('hyperparameters')}, final train loss "
                         f"{fmt(m.get('final_train_loss'))}, val loss "
                         f"{fmt(m.get('final_val_loss'))}")
    if run.saves:
        lines.append(f"checkpoints saved at steps: {', '.join(map(str, run.saves))}")
    if run.resumes:
        lines.append(f"resumed at steps: {', '.join(map(str, run.resumes))}")
    _, tp = series(run.steps, "samples_per_sec")
    if tp:
        lines.append(f"throughput: median {fmt(sorted(tp)[len(tp) // 2])} samples/s, "
                     f"last {fmt(tp[-1])}")
    if run.summary:
        lines.append("summary.json:")
        lines += [f"  {k}: {fmt(v)}" for k, v in sorted(run.summary.items())
                  if not isinstance(v, (dict, list))]
        goodput = run.summary.get("goodput")
        if isinstance(goodput, dict) and "goodput" in goodput:
            lines.append(f"  goodput: {fmt(goodput['goodput'])}")
    else:
        lines.append("summary.json: absent (the run has not finished)")
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        print(f"error: {message}; run with --help for the usage.", file=sys.stderr)
        sys.exit(USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m distributed.report WORKDIR [--out DIR]``; returns the exit code."""
    prog = "jax-bcd-report" if Path(sys.argv[0]).name == "jax-bcd-report" else \
        "python -m distributed.report"
    parser = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="the --workdir of a `python -m distributed.train` run")
    parser.add_argument("--out", default=None, help="output folder (default: WORKDIR/report)")
    args = parser.parse_args(argv)
    if (warning := check_import_name()) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        out = write_report(args.workdir, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return USAGE
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
