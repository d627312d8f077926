"""The default main job: finishes in minutes and beats the parametric-only fit."""

import pytest
from cli import run_cli, summary


@pytest.mark.slow
def test_default_main_job_beats_parametric_only_and_untrained(tmp_path):
    main, param = tmp_path / "default", tmp_path / "param"
    p = run_cli(f"--workdir={main}", "--host_devices=8", "--progress=log")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "done: step 288" in p.stderr
    s = summary(main)
    # same number of steps, parametric block only
    q = run_cli(f"--workdir={param}", "--host_devices=8", "--cycle=only-parametric",
                "--epochs_param=36", "--progress=none")
    assert q.returncode == 0, q.stderr[-3000:]
    b = summary(param)
    assert s["final_step"] == b["final_step"] == 288
    assert s["test_psf_rmse"] < 0.7 * b["test_psf_rmse"]
    assert s["test_opd_rmse"] < 0.8 * b["test_opd_rmse"]
    assert s["test_psf_rmse"] < 0.2 * s["initial_test_psf_rmse"]
    assert s["test_opd_rmse"] < 0.5 * s["initial_test_opd_rmse"]
    assert s["wall_s"] < 300
