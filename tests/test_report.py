"""`python -m distributed.report WORKDIR` on synthetic run folders (the real CLI run is in
test_trainer.py): what the records say must be what the figures draw."""

import json
import math
import sys

import numpy as np
import pytest

from distributed.cli.plots import make_figures
from distributed.cli.records import validation_groups
from distributed.cli.report import load_records, main, summary_text

PHASES = [("parametric", 1, 8, ("param",)), ("non-parametric", 9, 16, ("nonparam",)),
          ("complete", 17, 24, ("param", "nonparam"))]
LR = {"param": 1e-2, "nonparam": 3e-3, "all": 1e-3}
SAVES = [8, 16, 24]


def epoch_record(step, phase, blocks, loss):
    return {"step": step, "phase": phase, "event": "epoch", "epoch": step // 4 - 1,
            "train_loss": loss, "train_grad_norm": loss / 10,
            **{f"train_lr_{b}": LR[b] for b in blocks},
            "val_loss": 2 * loss, "val_masked_mse": 2 * loss, "val_mae": math.sqrt(loss)}


def write_run(wd, summary=True, phases=PHASES):
    """A run of 24 steps: steps logged every 2, epochs of 4 steps, a stop mid-epoch at step 10
    and a resume from step 8, the step-5 record logged twice and a line cut by a crash."""
    wd.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, first, last, blocks in phases:
        for s in range(first, last + 1):
            loss = 1e-3 * 0.7 ** s  # three decades over the run: needs a log axis
            if s % 2 == 1:
                lines.append({"step": s, "phase": name, "loss": loss, "grad_norm": loss / 10,
                              "update_norm": 1e-2, "samples_per_sec": 1000.0 + s,
                              "lr": LR[blocks[-1]], **{f"lr_{b}": LR[b] for b in blocks},
                              "epoch": (s - 1) // 4, "goodput": {"goodput": 0.5}})
            if s % 4 == 0:
                lines.append(epoch_record(s, name, blocks, loss))
            if s == 10:  # stopped mid-epoch 2, then resumed from the checkpoint at step 8
                lines.append({**epoch_record(10, name, blocks, 99.0), "epoch": 2})
                lines.append({"step": 8, "phase": name, "event": "resume",
                              "resumed_from_step": 8})
    lines.insert(3, {"step": 5, "phase": "parametric", "loss": 99.0})  # re-logged on resume
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"step": 25, "lo'  # cut by a crash
    (wd / "metrics.jsonl").write_text(text)
    (wd / "config.json").write_text(json.dumps({"model": "psf"}))
    (wd / "checkpoints" / "20").mkdir(parents=True)  # a save the summary does not list
    if summary:
        (wd / "summary.json").write_text(json.dumps({
            "final_step": 24, "final_val_loss": 2e-3 * 0.7 ** 24, "params_sha256": "ab" * 32,
            "wall_s": 12.5, "test_psf_rmse": 1e-4, "initial_test_psf_rmse": 1.5e-3,
            "test_opd_rmse": 0.01, "initial_test_opd_rmse": 0.04, "mesh": {"data": 8},
            "goodput": {"goodput": 0.42, "step_s": 5.25, "compile_s": 4.0, "wall_s": 12.5,
                        "saves": [{"step": s, "blocking_s": 0.1} for s in SAVES]}}))
    return wd


def by_gid(ax, gid):
    return [a for a in [*ax.lines, *ax.patches, *ax.texts] if a.get_gid() == gid]


def xs(line):
    return list(np.asarray(line.get_xdata(), dtype=float))


def test_records_are_deduplicated_and_classified(tmp_path):
    run = load_records(write_run(tmp_path / "run"))
    assert [r["step"] for r in run.steps] == list(range(1, 25, 2))
    assert next(r for r in run.steps if r["step"] == 5)["loss"] == pytest.approx(1e-3 * 0.7 ** 5)
    assert [r["step"] for r in run.epochs] == [4, 8, 12, 16, 20, 24]  # epoch 2 of step 10 gone
    assert all(r["train_loss"] < 1 for r in run.epochs)
    assert run.resumes == [8] and run.saves == [8, 16, 20, 24] and run.model == "psf"
    assert validation_groups(run) == [["val_loss", "val_masked_mse"], ["val_mae"]]


def test_an_epoch_split_by_a_clean_resume_is_rejoined(tmp_path):
    """Stopped at step 6 (mid-epoch 1) and resumed from step 6: the epoch's two halves are
    one record whose train means weigh each half by its steps."""
    wd = tmp_path / "run"
    wd.mkdir()
    recs = [{"step": 4, "event": "epoch", "epoch": 0, "train_loss": 3.0},
            {"step": 6, "event": "epoch", "epoch": 1, "train_loss": 1.0, "val_loss": 9.0},
            {"step": 6, "event": "resume", "resumed_from_step": 6},
            {"step": 8, "event": "epoch", "epoch": 1, "train_loss": 2.0, "val_loss": 5.0}]
    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    run = load_records(wd)
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in run.epochs[1:]] == [
        (8, (2 * 1.0 + 2 * 2.0) / 4, 5.0)]
    recs[2]["step"] = recs[2]["resumed_from_step"] = 4  # steps 5, 6 lost: the last record wins
    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert load_records(wd).epochs[1]["train_loss"] == 2.0


def test_loss_figure_log_axis_epoch_means_and_marks(tmp_path):
    run = load_records(write_run(tmp_path / "run"))
    (ax,) = make_figures(run)["loss.png"].axes
    assert ax.get_yscale() == "log"
    (steps,) = by_gid(ax, "loss:steps")
    (means,) = by_gid(ax, "loss:epoch_mean")
    (val,) = by_gid(ax, "val_loss")
    assert xs(steps) == list(range(1, 25, 2)) and steps.get_linestyle() == "None"
    assert xs(means) == xs(val) == [4, 8, 12, 16, 20, 24]
    np.testing.assert_allclose(means.get_ydata(), [1e-3 * 0.7 ** s for s in xs(means)])
    assert sorted(line.get_xdata()[0] for line in by_gid(ax, "phase_boundary")) == [8, 16]
    (saves,) = by_gid(ax, "checkpoint")
    assert xs(saves) == [8, 16, 20, 24]
    assert [line.get_xdata()[0] for line in by_gid(ax, "resume")] == [8]
    assert len(by_gid(ax, "phase")) == 3
    assert "mean squared pixel error" in ax.get_ylabel()
    assert {t.get_text() for t in ax.texts} >= {"parametric", "non-parametric", "complete"}
    labels = ax.get_legend_handles_labels()[1]
    assert {"checkpoint saved", "resumed", "phase boundary", "validation loss"} <= set(labels)


def test_optimizer_figure_shows_each_blocks_learning_rate(tmp_path):
    run = load_records(write_run(tmp_path / "run"))
    lr_ax, grad_ax, update_ax = make_figures(run)["optimizer.png"].axes
    lr = {gid: dict(zip(xs(line), line.get_ydata(), strict=True))
          for gid in ("lr_param", "lr_nonparam") for line in by_gid(lr_ax, gid)}
    assert lr["lr_param"][21] == pytest.approx(1e-2)  # the complete phase: both blocks
    assert lr["lr_nonparam"][21] == pytest.approx(3e-3)
    assert math.isnan(lr["lr_param"][13]) and math.isnan(lr["lr_nonparam"][3])  # frozen
    assert grad_ax.get_yscale() == "log"
    (mean,) = by_gid(grad_ax, "grad_norm:epoch_mean")  # broken at the phase boundaries
    assert sum(math.isnan(v) for v in mean.get_ydata()) == 2
    assert by_gid(update_ax, "update_norm:steps")


def test_one_validation_panel_per_distinct_metric(tmp_path):
    figures = make_figures(load_records(write_run(tmp_path / "run")))
    axes = figures["validation.png"].axes
    assert len(axes) == 2
    assert "val_masked_mse: identical" in axes[0].get_title()
    assert by_gid(axes[0], "val_loss") and by_gid(axes[1], "val_mae")
    assert all(by_gid(ax, "checkpoint") for ax in axes)


def test_test_figure_compares_with_the_untrained_model(tmp_path):
    figures = make_figures(load_records(write_run(tmp_path / "run")))
    opd, psf = figures["test.png"].axes
    assert [b.get_height() for b in by_gid(psf, "psf_rmse")] == [1.5e-3, 1e-4]
    assert [b.get_height() for b in by_gid(opd, "opd_rmse")] == [0.04, 0.01]
    assert "µm" in opd.get_ylabel() and "15× lower" in psf.get_title()
    assert psf.get_yscale() == "log"
    wall = figures["throughput.png"].axes[1]
    assert {p.get_gid() for p in wall.patches} == {"wall:step", "wall:compile"}


def test_report_writes_pngs_and_text(tmp_path, capsys):
    wd = write_run(tmp_path / "run")
    assert main([str(wd)]) == 0
    out = wd / "report"
    for name in ("loss.png", "optimizer.png", "validation.png", "test.png", "throughput.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    text = (out / "report.txt").read_text()
    assert "phase parametric: steps 1..8" in text
    assert "phase non-parametric: steps 9..16" in text and "phase complete: steps 17..24" in text
    assert "val_loss = val_masked_mse: final" in text
    assert "OPD RMSE (µm): 0.01 (untrained 0.04)" in text
    assert "checkpoints saved at steps: 8, 16, 20, 24" in text and "resumed at steps: 8" in text
    assert "final_step: 24" in text and "goodput: 0.42" in text
    assert "report written to" in capsys.readouterr().out


def test_running_single_phase_run_without_summary(tmp_path):
    wd = write_run(tmp_path / "run", summary=False, phases=[("train", 1, 12, ("all",))])
    assert main([str(wd), "--out", str(tmp_path / "elsewhere")]) == 0
    assert not (tmp_path / "elsewhere" / "test.png").exists()
    run = load_records(wd)
    assert "summary.json: absent" in summary_text(run)
    figures = make_figures(run)
    (ax,) = figures["loss.png"].axes
    assert not by_gid(ax, "phase") and not by_gid(ax, "phase_boundary")
    assert "BCD" not in ax.get_title() and "BCD" not in figures["optimizer.png"].axes[0].get_title()


def test_missing_matplotlib_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    wd = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    assert main([str(wd)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "pip install matplotlib (or the [report] extra" in err[0]
    assert not (wd / "report").exists()


@pytest.mark.parametrize("content", [None, "", "not json\n"])
def test_no_metrics_is_a_clear_error_with_exit_2(tmp_path, capsys, content):
    wd = tmp_path / "run"
    wd.mkdir()
    if content is not None:
        (wd / "metrics.jsonl").write_text(content)
    assert main([str(wd)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "metrics.jsonl" in err[0]
    assert not (wd / "report").exists()


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["a", "b"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unrecognized arguments")
