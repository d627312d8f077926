"""The command line: outputs, exact resume, restore on other device counts, bad input."""

import json

import numpy as np
import pytest
from cli import assert_one_line_error, metrics, run_cli, step_losses, summary, tensorboard_tags

# A small MLP run: 512 examples / batch 64 = 8 steps per epoch, 3 epochs = 24 steps.
MLP = ["--model=mlp", "--epochs=3", "--n_train=512", "--n_val=64", "--batch_size=64",
       "--log_every=1", "--checkpoint_every=4", "--progress=none"]


def test_outputs_and_summary(tmp_path):
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", "--host_devices=8", *MLP)
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(wd)
    assert s["final_step"] == 24 and s["resumed_from_step"] is None
    assert len(s["params_sha256"]) == 64
    assert s["final_train_loss"] < 1.0 and np.isfinite(s["final_val_loss"])
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["model"] == "mlp" and cfg["batch_size"] == 64
    recs = [r for r in metrics(wd) if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 25))
    for key in ("phase", "loss", "lr", "grad_norm"):
        assert key in recs[-1], key
    assert "samples_per_sec" in recs[-1]
    assert any("val_loss" in r for r in metrics(wd))
    steps = sorted(int(d.name) for d in (wd / "checkpoints").iterdir() if d.name.isdigit())
    assert steps[-1] == 24
    g = s["goodput"]
    parts = sum(v for k, v in g.items() if k.endswith("_s") and k not in
                ("wall_s", "lost_s_on_restart"))
    assert abs(parts - g["wall_s"]) <= 0.05 * g["wall_s"]


def test_resume_gives_the_uninterrupted_result(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(f"--workdir={full}", "--host_devices=8", *MLP).returncode == 0
    p1 = run_cli(f"--workdir={part}", "--host_devices=8", *MLP, "--max_steps=10")
    assert p1.returncode == 0, p1.stderr[-3000:]
    assert summary(part)["final_step"] == 10
    p2 = run_cli(f"--workdir={part}", "--host_devices=8", *MLP)
    assert p2.returncode == 0, p2.stderr[-3000:]
    s = summary(part)
    assert s["resumed_from_step"] == 10 and s["final_step"] == 24
    assert s["params_sha256"] == summary(full)["params_sha256"]
    # the data order after resume is the same: identical per-step losses
    a, b = step_losses(full), step_losses(part)
    assert all(a[k] == b[k] for k in range(11, 25)), (a, b)


@pytest.mark.parametrize("devices", [4, 1])
def test_checkpoint_from_8_devices_continues_on_fewer(tmp_path, devices):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(f"--workdir={full}", "--host_devices=8", *MLP).returncode == 0
    assert run_cli(f"--workdir={part}", "--host_devices=8", *MLP, "--max_steps=8").returncode == 0
    p = run_cli(f"--workdir={part}", f"--host_devices={devices}", f"--mesh=data:{devices}", *MLP)
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(part)
    assert s["resumed_from_step"] == 8 and s["device_count"] == devices
    a, b = step_losses(full), step_losses(part)
    np.testing.assert_allclose([b[k] for k in range(9, 25)], [a[k] for k in range(9, 25)],
                               rtol=1e-4)


def test_fsdp_run_restores_on_data_parallel_mesh(tmp_path):
    wd = tmp_path / "run"
    assert run_cli(f"--workdir={wd}", "--host_devices=8", "--mesh=data:2,fsdp:4", *MLP,
                   "--max_steps=8").returncode == 0
    p = run_cli(f"--workdir={wd}", "--host_devices=2", "--mesh=data:2", *MLP)
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(wd)["resumed_from_step"] == 8


# ----------------------------------------------------------------------------- bad input
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


BAD = [
    (["--cycle=sideways"], ["--cycle", "sideways", "complete"]),
    (["--model=resnet"], ["--model", "resnet", "psf"]),
    (["--no_such_flag=1"], ["no_such_flag"]),
    (["--batch_size=abc"], ["batch_size"]),
    (["--mesh=data:3"], ["data:3", "8"]),
    (["--mesh=data:2,model:4"], ["model"]),
    (["--batch_size=60"], ["batch_size=60", "8"]),
    (["--mesh=data:-1,fsdp:-1"], ["-1"]),
    (["--lr_param=-1"], ["lr_param"]),
    (["--num_processes=2"], ["--coordinator_address"]),
    (["--data=/nonexistent/stars.npz"], ["/nonexistent/stars.npz"]),
]


@pytest.mark.parametrize("args,needles", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_flags_exit_2_with_one_line(tmp_path, args, needles):
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", "--host_devices=8", *args)
    assert_one_line_error(p, *needles)
    assert not (wd / "summary.json").exists() and not (wd / "config.json").exists()
    assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())


def test_bad_data_files_exit_2(tmp_path):
    wd = tmp_path / "run"
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(128, 8)).astype(np.float32), rng.normal(size=(128, 2)).astype(
        np.float32)
    xn = x.copy()
    xn[17, 3] = np.nan
    cases = {
        "nan": (_npz(tmp_path / "nan.npz", x=xn, y=y), ["x", "17"]),
        "lengths": (_npz(tmp_path / "len.npz", x=x, y=y[:100]), ["x", "y"]),
        "missing_key": (_npz(tmp_path / "nokey.npz", x=x), ["'y'"]),
    }
    garbled = tmp_path / "garbled.npz"
    garbled.write_bytes(b"this is not an npz file at all")
    cases["garbled"] = (garbled, [str(garbled)])
    for name, (path, needles) in cases.items():
        p = run_cli(f"--workdir={wd}", "--host_devices=8", "--model=mlp", f"--data={path}")
        assert_one_line_error(p, *needles)
        assert not (wd / "config.json").exists(), name


def test_own_npz_data_trains(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 5)).astype(np.float32)
    y = (x[:, :1] * 2 - x[:, 1:2]).astype(np.float32)
    path = _npz(tmp_path / "mine.npz", x=x, y=y)
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", "--host_devices=8", "--model=mlp", f"--data={path}",
                "--epochs=2", "--batch_size=32", "--progress=none")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(wd)["final_step"] == -(-2 * int(256 * 0.9) // 32)  # every row, every epoch


def test_workdir_with_a_different_run_is_refused(tmp_path):
    wd = tmp_path / "run"
    assert run_cli(f"--workdir={wd}", "--host_devices=8", *MLP, "--max_steps=2").returncode == 0
    p = run_cli(f"--workdir={wd}", "--host_devices=8", *MLP, "--seed=5")
    assert_one_line_error(p, "seed", "--force")


def test_tensorboard_event_files(tmp_path):
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", "--host_devices=8", *MLP, "--max_steps=4", "--tensorboard")
    assert p.returncode == 0, p.stderr[-3000:]
    tags = tensorboard_tags(wd / "tensorboard")
    assert {"train/loss", "train/grad_norm", "train/lr", "perf/step_s"} <= tags, tags
