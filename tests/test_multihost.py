"""Multi-host for real, through the command line: 2 processes x 4 simulated devices (joined by
jax.distributed via launch/local.py) train the default PSF model to the same losses as 1 process
x 8 devices; resume is exact on either topology; checkpoints move between process counts; a
killed process does not leave the other hanging.

Every run is a real `python -m distributed.train` (module-scoped fixtures share them between
tests). 4 steps per epoch x 3 phases = 12 steps; partial runs stop at step K (mid-epoch).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cli import ROOT, cli_env, metrics, run_cli, step_losses, summary

pytestmark = pytest.mark.slow

LOCAL = str(ROOT / "launch" / "local.py")
TINY = ["--n_train=128", "--n_val=32", "--n_test=32", "--batch_size=32", "--epochs_param=1",
        "--epochs_nonparam=1", "--epochs_complete=1", "--log_every=1", "--progress=none"]
STEPS = 12
K = 6  # the partial runs stop here: mid-epoch of the non-parametric phase


def env():
    return {k: v for k, v in cli_env().items() if not k.startswith("DISTRIBUTED_")}


def two(workdir, *args, timeout=600):
    """2 processes x 4 devices via launch/local.py (which kills its children on timeout)."""
    cmd = [sys.executable, LOCAL, "--processes=2", "--devices_per_process=4",
           f"--timeout={timeout - 30}", "--", sys.executable, "-m", "distributed.train",
           f"--workdir={workdir}", *TINY, *args]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    print(f"\n2x4 {Path(workdir).name} {' '.join(args)}: {time.monotonic() - t0:.1f} s")
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
    return p


def one(workdir, *args, devices=8):
    t0 = time.monotonic()
    p = run_cli(f"--workdir={workdir}", f"--host_devices={devices}", *TINY, *args,
                env={k: "" for k in os.environ if k.startswith("DISTRIBUTED_")})
    print(f"\n1x{devices} {Path(workdir).name} {' '.join(args)}: {time.monotonic() - t0:.1f} s")
    assert p.returncode == 0, p.stderr[-6000:]
    return p


def branch(checkpoints: Path, workdir: Path) -> Path:
    """A new workdir holding a copy of `checkpoints` (and no config.json: a fresh workdir)."""
    workdir.mkdir(parents=True)
    shutil.copytree(checkpoints, workdir / "checkpoints")
    return workdir


def val_losses(workdir):
    return {r["step"]: r["val_loss"] for r in metrics(workdir) if "val_loss" in r}


def assert_close_losses(a, b, steps, rtol=1e-4):
    assert set(steps) <= set(a) and set(steps) <= set(b), (sorted(a), sorted(b))
    got, want = [b[k] for k in steps], [a[k] for k in steps]
    assert np.all(np.isfinite(got)), got
    np.testing.assert_allclose(got, want, rtol=rtol)


# ------------------------------------------------------------------------------------ the runs
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("multihost")


@pytest.fixture(scope="module")
def two_full(base):
    wd = base / "two_full"
    return wd, two(wd)


@pytest.fixture(scope="module")
def one_full(base):
    wd = base / "one_full"
    return wd, one(wd)


@pytest.fixture(scope="module")
def two_part(base):
    """2x4 stopped at step K; its checkpoints are also kept aside for other process counts."""
    wd = base / "two_part"
    two(wd, f"--max_steps={K}")
    snapshot = base / "two_part_checkpoints"
    shutil.copytree(wd / "checkpoints", snapshot)
    return wd, snapshot


@pytest.fixture(scope="module")
def one_part(base):
    wd = base / "one_part"
    one(wd, f"--max_steps={K}")
    snapshot = base / "one_part_checkpoints"
    shutil.copytree(wd / "checkpoints", snapshot)
    return wd, snapshot


# ----------------------------------------------------------------------------------- the tests
def test_two_processes_train_like_one(two_full, one_full):
    (wd2, _), (wd1, _) = two_full, one_full
    s2, s1 = summary(wd2), summary(wd1)
    assert (s2["process_count"], s2["device_count"]) == (2, 8)
    assert (s1["process_count"], s1["device_count"]) == (1, 8)
    assert s2["final_step"] == s1["final_step"] == STEPS
    a, b = step_losses(wd1), step_losses(wd2)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert_close_losses(a, b, range(1, STEPS + 1))
    assert sorted(val_losses(wd2)) == sorted(val_losses(wd1)) == [4, 8, 12]
    assert_close_losses(val_losses(wd1), val_losses(wd2), [4, 8, 12])
    np.testing.assert_allclose(s2["final_val_loss"], s1["final_val_loss"], rtol=1e-4)
    np.testing.assert_allclose(s2["test_psf_rmse"], s1["test_psf_rmse"], rtol=1e-4)


def test_only_process_0_writes(two_full):
    wd, p = two_full
    out = p.stdout
    # both processes joined one run: runtime's RuntimeInfo.log_line() from each; only process
    # 0 writes INFO lines to the console, every process writes them to its log file
    assert re.search(r"^\[p0\] .*\[distributed\] process 0/2 .*global_devices=8 .*via=env$",
                     out, flags=re.M), out[-4000:]
    assert not re.search(r"^\[p1\] .* INFO ", out, flags=re.M), out[-4000:]
    p1_log = (wd / "logs" / "process-1.log").read_text()
    assert re.search(r"\[distributed\] process 1/2 .*global_devices=8 .*via=env", p1_log)
    assert re.search(r" INFO .*done: step", (wd / "logs" / "process-0.log").read_text())
    done = [line for line in out.splitlines() if " done: " in line]
    assert len(done) == 1 and done[0].startswith("[p0] "), done
    assert f"done: step {STEPS}" in done[0]
    # one writer: every step's record once, every validation once
    recs = metrics(wd)
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 8, 12]
    names = {f.name for f in wd.iterdir()}
    assert {"checkpoints", "config.json", "metrics.jsonl", "summary.json"} <= names, names
    assert not [n for n in names if n.startswith(".") or "tmp" in n], names  # no half-writes
    s = summary(wd)
    assert s["process_count"] == 2 and s["resumed_from_step"] is None
    assert len(s["params_sha256"]) == 64


def test_two_process_resume_is_exact(two_full, two_part):
    (full, _), (wd, _) = two_full, two_part
    assert summary(wd)["final_step"] == K
    two(wd)  # re-run in the same workdir: resumes from step K
    s = summary(wd)
    assert (s["resumed_from_step"], s["final_step"], s["process_count"]) == (K, STEPS, 2)
    assert s["params_sha256"] == summary(full)["params_sha256"]
    a, b = step_losses(full), step_losses(wd)
    assert all(a[k] == b[k] for k in range(1, STEPS + 1)), (a, b)


def test_one_process_resume_is_exact(one_full, one_part):
    (full, _), (wd, _) = one_full, one_part
    one(wd)
    s = summary(wd)
    assert (s["resumed_from_step"], s["final_step"], s["process_count"]) == (K, STEPS, 1)
    assert s["params_sha256"] == summary(full)["params_sha256"]


def test_checkpoint_of_two_processes_continues_in_one(base, two_full, two_part):
    (full, _), (_, ckpts) = two_full, two_part
    wd = branch(ckpts, base / "two_to_one")
    one(wd, "--mesh=data:4", devices=4)
    s = summary(wd)
    assert (s["resumed_from_step"], s["final_step"]) == (K, STEPS)
    assert (s["process_count"], s["device_count"]) == (1, 4)
    assert_close_losses(step_losses(full), step_losses(wd), range(K + 1, STEPS + 1))
    np.testing.assert_allclose(s["final_val_loss"], summary(full)["final_val_loss"], rtol=1e-4)


def test_checkpoint_of_one_process_continues_in_two(base, one_full, one_part):
    (full, _), (_, ckpts) = one_full, one_part
    wd = branch(ckpts, base / "one_to_two")
    p = two(wd, "--device_data=off")  # (also the Grain host pipeline over two processes)
    assert "input: the Grain host pipeline" in p.stdout
    s = summary(wd)
    assert (s["resumed_from_step"], s["final_step"]) == (K, STEPS)
    assert (s["process_count"], s["device_count"]) == (2, 8)
    assert_close_losses(step_losses(full), step_losses(wd), range(K + 1, STEPS + 1))
    np.testing.assert_allclose(s["final_val_loss"], summary(full)["final_val_loss"], rtol=1e-4)


def test_killing_one_process_stops_the_other(tmp_path):
    """kill -9 of process 1 (not the coordinator: jax alone would let process 0 wait for its
    100 s heartbeat timeout) mid-training: local.py stops process 0 and fails, within 60 s."""
    wd = tmp_path / "kill"
    cmd = [sys.executable, LOCAL, "--processes=2", "--devices_per_process=4", "--print_pids",
           "--timeout=500", "--", sys.executable, "-m", "distributed.train", f"--workdir={wd}",
           *TINY, "--epochs_complete=1000", "--progress=log"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env(), cwd=ROOT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True)
    reader.start()
    pids = {}
    try:
        deadline = time.monotonic() + 450
        while time.monotonic() < deadline and p.poll() is None:
            text = "".join(lines)
            pids = {int(i): int(pid) for i, pid in
                    re.findall(r"^\[local\] process (\d) pid (\d+)$", text, flags=re.M)}
            # both processes are past a training step (their collectives ran)
            log1 = wd / "logs" / "process-1.log"
            if re.search(r"^\[p0\] .* INFO step 2 ", text, flags=re.M) and log1.exists() \
                    and " step 2 " in log1.read_text():
                break
            time.sleep(0.2)
        assert p.poll() is None and set(pids) == {0, 1}, "".join(lines)[-6000:]
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        rc = p.wait(timeout=90)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(5)
    out = "".join(lines)
    print(f"\nkill -9 of process 1: everything ended after {took:.1f} s")
    assert rc != 0 and took < 60, (rc, took, out[-4000:])
    assert "[local] process 1 failed with exit code 137" in out, out[-4000:]
    for pid in pids.values():
        assert _gone(pid), out[-4000:]
    assert not (wd / "summary.json").exists()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True

