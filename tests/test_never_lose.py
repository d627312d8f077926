"""Never lose a run (issue 12): one lock per workdir, idempotent re-runs, refused attempts that
change nothing, checksummed checkpoints, fingerprinted inputs, no escapes from the workdir, one
line for every bad input, bounded resources, no orphans."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli import ROOT, assert_one_line_error, cli_env, run_cli, summary

MLP = ["--model=mlp", "--epochs=3", "--n_train=256", "--n_val=64", "--batch_size=32",
       "--checkpoint_every=8", "--log_every=4", "--progress=log", "--host_devices=8"]
STEPS = 24


def snapshot(folder):
    """Every file under ``folder``: relative path -> (sha256 of its bytes, mtime)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(),
                                               p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run (24 steps, checkpoints at 8, 16, 24) to copy from."""
    wd = tmp_path_factory.mktemp("done") / "run"
    p = run_cli(f"--workdir={wd}", *MLP)
    assert p.returncode == 0, p.stderr[-3000:]
    return wd


def copy_of(done, tmp_path, name="run"):
    wd = tmp_path / name
    shutil.copytree(done, wd, symlinks=True)
    return wd


# ------------------------------------------------------------------------------ lock (1)


def test_a_second_copy_of_a_running_command_exits_at_once(tmp_path):
    wd = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "distributed.train", f"--workdir={wd}",
                              *MLP, "--epochs=300"], env=cli_env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:  # the lock is held from here on
            if "INFO phase 1/1" in line:
                break
        t0 = time.monotonic()
        second = run_cli(f"--workdir={wd}", *MLP, "--epochs=300")
        assert time.monotonic() - t0 < 60
        err = assert_one_line_error(second, "in use by another run",
                                    f"pid {first.pid}", socket.gethostname())
        assert "started" in err
        assert first.poll() is None  # the first copy is unharmed
    finally:
        first.kill()
        first.wait()


def _unfinished(done, tmp_path, name):
    """A copy of the finished run as a crash after step 16 would leave it."""
    wd = copy_of(done, tmp_path, name)
    (wd / "summary.json").unlink()
    shutil.rmtree(wd / "checkpoints" / "24")
    return wd


def test_a_stale_lock_is_taken_over_with_a_warning(done, tmp_path):
    wd = _unfinished(done, tmp_path, "stale")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (wd / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                          "started": "2026-01-01T00:00:00"}))
    p = run_cli(f"--workdir={wd}", *MLP)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "taking over the stale lock" in p.stderr
    assert summary(wd)["resumed_from_step"] == 16
    assert not (wd / ".lock").exists()
    held = _unfinished(done, tmp_path, "held")
    (held / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                            "started": "2026-01-01T00:00:00"}))
    before = snapshot(held)
    p = run_cli(f"--workdir={held}", *MLP)
    assert_one_line_error(p, "in use by another run", f"pid {os.getpid()}")
    assert snapshot(held) == before


# ------------------------------------------------------------- idempotent re-runs (2, 3)


def test_rerunning_a_finished_run_says_so_and_touches_nothing(done, tmp_path):
    wd = copy_of(done, tmp_path)
    before = snapshot(wd)
    p = run_cli(f"--workdir={wd}", *MLP)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "is complete (step 24); nothing to do" in p.stderr
    assert "trained all its epochs" in p.stderr and "--allow_changed_inputs" in p.stderr
    assert snapshot(wd) == before
    # the way to train on that the line gives: more epochs; --force alone is not enough
    longer = [a for a in MLP if not a.startswith("--epochs=")] + ["--epochs=4"]
    p = run_cli(f"--workdir={wd}", *longer, "--force")
    assert_one_line_error(p, "--epochs was 3, now 4", "--allow_changed_inputs")
    assert snapshot(wd) == before
    p = run_cli(f"--workdir={wd}", *longer, "--force", "--allow_changed_inputs")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (summary(wd)["resumed_from_step"], summary(wd)["final_step"]) == (24, 32)


def test_a_kill_between_the_last_commit_and_the_summary_trains_no_extra_step(done, tmp_path):
    wd = copy_of(done, tmp_path)
    want = summary(wd)
    (wd / "summary.json").unlink()  # the state of a run killed right after its last commit
    p = run_cli(f"--workdir={wd}", *MLP)
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(wd)
    assert s["final_step"] == STEPS and s["params_sha256"] == want["params_sha256"]
    assert s["final_train_loss"] == pytest.approx(want["final_train_loss"])
    assert s["final_val_loss"] == pytest.approx(want["final_val_loss"])
    assert sorted(int(x.name) for x in (wd / "checkpoints").iterdir()) == [8, 16, 24]


def test_refused_attempts_change_nothing_on_disk(done, tmp_path):
    wd = copy_of(done, tmp_path)
    before = snapshot(wd)
    other = tmp_path / "five.npz"
    rng = np.random.default_rng(0)
    np.savez(other, x=rng.normal(size=(256, 5)).astype(np.float32),
             y=rng.normal(size=(256, 2)).astype(np.float32))
    p = run_cli(f"--workdir={wd}", *MLP, f"--data={other}", "--force")
    assert_one_line_error(p, "checkpoints of another model or shape")
    assert snapshot(wd) == before
    (wd / "summary.json").unlink()
    for step in (8, 16, 24):  # every checkpoint unreadable
        (wd / "checkpoints" / str(step) / "metadata" / "metadata").write_text("{garbage")
    before = snapshot(wd)
    p = run_cli(f"--workdir={wd}", *MLP)
    assert_one_line_error(p, "No usable checkpoint", "--restart_from_scratch")
    assert snapshot(wd) == before


# -------------------------------------------------------------------- checksums (4)


def test_one_flipped_bit_in_array_data_falls_back_to_the_previous_step(done, tmp_path):
    wd = copy_of(done, tmp_path)
    want = summary(wd)["params_sha256"]
    (wd / "summary.json").unlink()
    data = sorted((wd / "checkpoints" / "24" / "state").glob("ocdbt.process_0/d/*"),
                  key=lambda p: p.stat().st_size)[-1]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 4] ^= 0x10  # inside an array's stored bytes (not compressed)
    data.write_bytes(bytes(raw))
    p = run_cli(f"--workdir={wd}", *MLP)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "does not match its checksum" in p.stderr
    assert "moved the unusable checkpoint step 24 aside" in p.stderr
    s = summary(wd)
    assert s["resumed_from_step"] == 16 and s["params_sha256"] == want


# --------------------------------------------------------------- changed inputs (5)


def test_changed_data_or_settings_on_resume_are_refused(done, tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.normal(size=(256, 8)).astype(np.float32),
             y=rng.normal(size=(256, 2)).astype(np.float32))
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", *MLP, f"--data={data}", "--max_steps=8")
    assert p.returncode == 0, p.stderr[-3000:]
    np.savez(data, x=rng.normal(size=(300, 8)).astype(np.float32),  # replaced: other rows
             y=rng.normal(size=(300, 2)).astype(np.float32))
    before = snapshot(wd)
    p = run_cli(f"--workdir={wd}", *MLP, f"--data={data}", "--max_steps=16")
    assert_one_line_error(p, "train data differ", "--allow_changed_inputs")
    assert snapshot(wd) == before
    p = run_cli(f"--workdir={wd}", *MLP, f"--data={data}", "--max_steps=16",
                "--allow_changed_inputs")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(wd)["resumed_from_step"] == 8
    (wd / "config.json").unlink()  # no config.json: the checkpoint still knows its settings
    p = run_cli(f"--workdir={wd}", *MLP, f"--data={data}", "--max_steps=20", "--seed=5",
                "--allow_changed_inputs")
    assert p.returncode == 0, p.stderr[-3000:]  # allowed explicitly
    (wd / "config.json").unlink()
    p = run_cli(f"--workdir={wd}", *MLP, f"--data={data}", "--max_steps=24", "--seed=5",
                "--learning_rate=0.5")
    assert_one_line_error(p, "trained with other settings", "--learning_rate")


# ---------------------------------------------------------------- nothing trained (6)


def test_a_run_without_a_single_finite_update_fails_and_keeps_its_checkpoint(tmp_path):
    rng = np.random.default_rng(2)
    data = tmp_path / "huge.npz"
    np.savez(data, x=(rng.normal(size=(256, 8)) * 1e30).astype(np.float32),
             y=rng.normal(size=(256, 2)).astype(np.float32))
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", *MLP, f"--data={data}")
    assert p.returncode == 1, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no finite update" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not (wd / "summary.json").exists()
    assert any(x.name.isdigit() for x in (wd / "checkpoints").iterdir())
    for line in (wd / "metrics.jsonl").read_text().splitlines():  # strict JSON, no NaN
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


@pytest.mark.parametrize("flag", ["--explosion_factor=nan", "--watchdog_s=nan",
                                  "--l2_param=nan", "--weight_decay=inf",
                                  "--warmup_steps=1000000000000", "--seed=-1",
                                  "--host_devices=100000"])
def test_non_finite_and_absurd_settings_are_refused(tmp_path, flag):
    wd = tmp_path / "run"
    name = flag.split("=")[0]
    p = run_cli(f"--workdir={wd}", *[a for a in MLP if not a.startswith(name)], flag)
    assert_one_line_error(p, flag)
    assert not wd.exists()


# ----------------------------------------------------------------------- escapes (7)


def test_symlinks_in_the_workdir_are_never_followed(done, tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    for name in (".config.json.tmp", "metrics.jsonl", "checkpoints"):
        wd = copy_of(done, tmp_path, f"run{name}")
        target = wd / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        target.symlink_to(outside)
        p = run_cli(f"--workdir={wd}", *MLP, "--restart_from_scratch")
        assert_one_line_error(p, "symbolic link", name)
        assert outside.read_text() == "precious"
        assert target.is_symlink()


def test_a_folder_that_holds_no_run_is_not_adopted(tmp_path):
    wd = tmp_path / "notes"
    wd.mkdir()
    (wd / "summary.json").write_text('{"mine": true}')
    p = run_cli(f"--workdir={wd}", *MLP)
    assert_one_line_error(p, "holds no run", "--force")
    assert json.loads((wd / "summary.json").read_text()) == {"mine": True}


# -------------------------------------------------------------- one line, not a wall (8, 11)


def test_broken_workdirs_and_data_give_one_line(done, tmp_path):
    wd = copy_of(done, tmp_path, "cfgdir")
    (wd / "config.json").unlink()
    (wd / "config.json").mkdir()
    assert_one_line_error(run_cli(f"--workdir={wd}", *MLP), "config.json is not a file")
    wd = tmp_path / "ckfile"
    wd.mkdir()
    (wd / "checkpoints").write_text("not a folder")
    assert_one_line_error(run_cli(f"--workdir={wd}", *MLP, "--force"),
                          "checkpoints is not a folder")
    empty = tmp_path / "nofeatures.npz"
    np.savez(empty, x=np.zeros((64, 0), np.float32), y=np.zeros((64, 2), np.float32))
    assert_one_line_error(run_cli(f"--workdir={tmp_path / 'r0'}", *MLP, f"--data={empty}"),
                          "'x'", "no features")
    odd = tmp_path / "my[1].npz"
    np.savez(odd, x=np.ones((64, 3), np.float32), y=np.ones((64, 1), np.float32))
    p = run_cli(f"--workdir={tmp_path / 'r1'}", *MLP, f"--data={odd}", "--max_steps=2")
    assert p.returncode == 0, p.stderr[-3000:]  # a real file name with glob characters
    assert_one_line_error(run_cli(f"--workdir={tmp_path / 'r2'}", *MLP, f"--data={tmp_path}"),
                          "is a directory")
    text = tmp_path / "notes.npz"
    text.write_text("x,y\n1,2\n")
    p = run_cli(f"--workdir={tmp_path / 'r3'}", *MLP, f"--data={text}")
    assert "pickle" not in assert_one_line_error(p, "is not an .npz file", "np.savez")
    assert not (tmp_path / "r3").exists()


@pytest.fixture
def tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()

    def make(size, readonly=False):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                       check=True)
        return mount

    yield make
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def test_a_full_disk_at_start_is_one_line(tmpfs):
    mount = tmpfs("64k")
    _fill(mount / "filler")
    p = run_cli(f"--workdir={mount / 'run'}", *MLP)
    assert_one_line_error(p, "no space left", "bytes free")


def test_a_full_disk_during_a_run_is_one_line_and_keeps_the_checkpoints(tmpfs):
    mount = tmpfs("1m")
    (mount / "filler").write_bytes(b"x" * 300_000)
    wd = mount / "run"
    p = run_cli(f"--workdir={wd}", *MLP, "--epochs=60", "--checkpoint_every=4",
                "--max_to_keep=100")
    assert p.returncode == 1, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]  # TensorStore's late callbacks too
    committed = sorted(int(x.name) for x in (wd / "checkpoints").iterdir() if x.name.isdigit())
    assert committed, "the checkpoints before the disk filled up are kept"
    subprocess.run(["mount", "-o", "remount,size=32m", str(mount)], check=True)
    p = run_cli(f"--workdir={wd}", *MLP, "--epochs=60", "--checkpoint_every=4",
                "--max_to_keep=100", f"--max_steps={committed[-1] + 4}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(wd)["resumed_from_step"] == committed[-1]


def test_a_read_only_folder_holding_a_run_is_one_line(done, tmp_path):
    wd = copy_of(done, tmp_path)
    (wd / "summary.json").unlink()
    subprocess.run(["mount", "--bind", "-o", "ro", str(wd), str(wd)], check=True)
    try:
        p = run_cli(f"--workdir={wd}", *MLP)
        assert_one_line_error(p, "not writable")
    finally:
        subprocess.run(["umount", "-l", str(wd)], check=False)


# --------------------------------------------------------------------- orphans (10)


def test_killing_the_launcher_kills_its_processes(tmp_path):
    cmd = [sys.executable, "launch/local.py", "--processes=2", "--devices_per_process=1",
           "--print_pids", "--", sys.executable, "-c", "import time; time.sleep(120)"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env=cli_env())
    pids = []
    for line in launcher.stdout:
        if "pid" in line:
            pids.append(int(line.rsplit(" ", 1)[1]))
        if len(pids) == 2:
            break
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if os.path.exists(f"/proc/{p}")
             and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
    assert not alive, alive
