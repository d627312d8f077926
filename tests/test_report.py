"""`python -m distributed.report WORKDIR` on synthetic run folders (the real CLI run is in
test_trainer.py)."""

import json

import pytest

from distributed.cli.report import load_records, main, summary_text

PHASES = [("parametric", 1, 8), ("non-parametric", 9, 16), ("complete", 17, 24)]


def write_run(wd, summary=True):
    wd.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, first, last in PHASES:
        for s in range(first, last + 1, 2):
            lines.append({"step": s, "phase": name, "loss": 1.0 / s, "lr": 1e-2,
                          "grad_norm": 0.5, "samples_per_sec": 1000.0 + s, "epoch": s // 4,
                          "goodput": {"goodput": 0.5}})
        lines.append({"step": last, "phase": name, "val_loss": 2.0 / last,
                      "val_masked_mse": 2.0 / last, "epoch": last // 4})
    lines.insert(2, {"step": 5, "phase": "parametric", "loss": 99.0})  # re-logged on resume
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"step": 25, "lo'  # cut by a crash
    (wd / "metrics.jsonl").write_text(text)
    if summary:
        (wd / "summary.json").write_text(json.dumps({
            "final_step": 24, "final_val_loss": 2.0 / 24, "params_sha256": "ab" * 32,
            "wall_s": 12.5, "goodput": {"goodput": 0.42}, "mesh": {"data": 8}}))
    return wd


def test_report_writes_pngs_and_text(tmp_path, capsys):
    wd = write_run(tmp_path / "run")
    assert main([str(wd)]) == 0
    out = wd / "report"
    for name in ("loss.png", "validation.png", "throughput.png", "optimizer.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    text = (out / "report.txt").read_text()
    assert "phase parametric: steps 1..7" in text
    assert "phase non-parametric: steps 9..15" in text and "phase complete" in text
    assert f"best {2.0 / 24:.6g} at step 24" in text
    assert "final_step: 24" in text and "goodput: 0.42" in text
    assert "report written to" in capsys.readouterr().out


def test_records_are_deduplicated_and_bad_lines_skipped(tmp_path):
    steps, vals, summary = load_records(write_run(tmp_path / "run"))
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps})
    assert next(r for r in steps if r["step"] == 5)["loss"] == pytest.approx(1 / 5)
    assert [r["step"] for r in vals] == [8, 16, 24]
    assert summary["final_step"] == 24


def test_running_run_without_summary_and_custom_out(tmp_path):
    wd = write_run(tmp_path / "run", summary=False)
    assert main([str(wd), "--out", str(tmp_path / "elsewhere")]) == 0
    assert "absent" in (tmp_path / "elsewhere" / "report.txt").read_text()
    steps, vals, _ = load_records(wd)
    assert "summary.json: absent" in summary_text(wd, steps, vals, {})


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
