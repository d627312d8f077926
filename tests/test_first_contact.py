"""First contact (issue 13): help and flag groups, config files that reproduce a run, the user's
own validation and test files, the exported model, the profiler, MLflow and TensorBoard, what a
resume says, missing extras, and the terminal under a progress bar."""

import json
import os
import pty
import re
import select
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli import (
    ROOT,
    assert_one_line_error,
    cli_env,
    metrics,
    run_cli,
    summary,
    tensorboard_tags,
)

from distributed import load_model
from distributed.cli.config import GROUPS, config_fields

FAST = ["--model=mlp", "--epochs=2", "--n_train=256", "--n_val=64", "--batch_size=32",
        "--log_every=4", "--progress=log", "--host_devices=8"]


# ------------------------------------------------------------------------------- help (3)


@pytest.mark.parametrize("flag", ["--help", "--helpfull", "-h"])
def test_help_exits_0_with_the_flags_grouped_by_topic(flag):
    p = run_cli(flag)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    positions = [out.index(f"\n{group}:\n") for group in GROUPS]
    assert positions == sorted(positions)  # every section, in order
    for f in config_fields():
        assert f"  --{f.name}=" in out
    assert "--verbosity" not in out and "--log_dir" not in out  # absl's own stay hidden


def test_every_field_belongs_to_one_group():
    assert {f.metadata["group"] for f in config_fields()} <= set(GROUPS)


# -------------------------------------------------- config files, own val/test data (6)


def test_a_runs_config_json_reproduces_it(tmp_path):
    a = tmp_path / "a"
    p = run_cli(f"--workdir={a}", *FAST, "--seed=3", "--learning_rate=0.003")
    assert p.returncode == 0, p.stderr[-3000:]
    b = tmp_path / "b"
    p = run_cli(f"--config={a / 'config.json'}", f"--workdir={b}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(b)["params_sha256"] == summary(a)["params_sha256"]
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("model: mlp\nepochs: 2\nn_train: 256\nn_val: 64\nbatch_size: 32\n"
                        "seed: 3\nlearning_rate: 0.003\nhost_devices: 8\n")
    c = tmp_path / "c"
    p = run_cli(f"--config={yaml_cfg}", f"--workdir={c}", "--progress=none", "--log_every=4")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(c)["params_sha256"] == summary(a)["params_sha256"]
    d = tmp_path / "d"  # a flag on the command line wins over the file
    p = run_cli(f"--config={yaml_cfg}", f"--workdir={d}", "--seed=4", "--progress=none")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((d / "config.json").read_text())["seed"] == 4
    bad = tmp_path / "bad.json"
    bad.write_text('{"learning_rte": 0.1}')
    assert_one_line_error(run_cli(f"--config={bad}", f"--workdir={tmp_path / 'e'}"),
                          "learning_rte")
    # values of the wrong type: one line naming the field, never converted ("no" is not False)
    for text, needle in (('{"epochs": "two"}', "epochs='two' must be an int"),
                         ('{"mesh": 5}', "mesh=5 must be a str"),
                         ('{"tensorboard": "no"}', "tensorboard='no' must be a bool")):
        bad.write_text(text)
        assert_one_line_error(run_cli(f"--config={bad}", f"--workdir={tmp_path / 'f'}"), needle)
        assert not (tmp_path / "f").exists()


def test_config_values_convert_only_where_nothing_is_lost():
    from distributed.cli.config import from_dict

    cfg = from_dict({"batch_size": 64.0, "learning_rate": "1e-3", "l1_rate": 0})
    assert (cfg.batch_size, cfg.learning_rate, cfg.l1_rate) == (64, 1e-3, 0.0)
    assert type(cfg.batch_size) is int and type(cfg.l1_rate) is float
    for bad, needle in (({"batch_size": 64.5}, "batch_size=64.5 must be an int"),
                        ({"device_data": False}, "quote words such as 'off'"),
                        ({"tensorboard": "yes"}, "must be a bool"),
                        ({"learning_rate": "fast"}, "must be a float")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            from_dict(bad)


def test_own_validation_and_test_files(tmp_path):
    rng = np.random.default_rng(0)

    def npz(name, n):
        path = tmp_path / f"{name}.npz"
        x = rng.normal(size=(n, 5)).astype(np.float32)
        np.savez(path, x=x, y=np.sin(x[:, :2]).astype(np.float32))
        return path

    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", *FAST, f"--data={npz('train', 200)}",
                f"--val_data={npz('val', 37)}", f"--test_data={npz('test', 29)}")
    assert p.returncode == 0, p.stderr[-3000:]
    s = summary(wd)
    model, header = load_model(wd / "model.eqx")  # the exported model
    assert header["model"] == "mlp" and header["training"]["step"] == s["final_step"]
    import jax.numpy as jnp

    with np.load(tmp_path / "test.npz") as f:
        x, y = f["x"], f["y"]
    pred = np.asarray(model(jnp.asarray(x)))
    assert s["test_loss"] == pytest.approx(float(np.mean((pred - y) ** 2)), rel=1e-4)
    assert "initial_test_loss" in s and s["initial_test_loss"] > s["test_loss"]
    with np.load(tmp_path / "val.npz") as f:
        vx, vy = f["x"], f["y"]
    vpred = np.asarray(model(jnp.asarray(vx)))
    assert s["final_val_loss"] == pytest.approx(float(np.mean((vpred - vy) ** 2)), rel=1e-4)
    odd = tmp_path / "odd.npz"
    np.savez(odd, x=np.ones((10, 3), np.float32), y=np.ones((10, 2), np.float32))
    assert_one_line_error(run_cli(f"--workdir={tmp_path / 'r2'}", *FAST,
                                  f"--data={tmp_path / 'train.npz'}", f"--val_data={odd}"),
                          "--val_data", "do not match")


# --------------------------------------------------- profiler, tracking (8, 9), resume (2)


def test_profile_mlflow_tensorboard_and_the_resume_line(tmp_path):
    mlflow = pytest.importorskip("mlflow")  # the test extra installs it
    wd = tmp_path / "run"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = run_cli(f"--workdir={wd}", *FAST, "--max_steps=12", "--profile_steps=3:5",
                "--tensorboard", f"--mlflow_uri={store}", "--checkpoint_every=8")
    assert p.returncode == 0, p.stderr[-3000:]
    assert list((wd / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    tags = tensorboard_tags(wd / "tensorboard")
    assert {"train/loss", "train/grad_norm", "val/loss", "perf/samples_per_sec"} <= set(tags)
    client = mlflow.MlflowClient(store)
    run = client.search_runs([client.get_experiment_by_name("distributed").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["seed"] == "0"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4  # 1,4,8,12
    assert run.data.metrics["summary/final_step"] == 12
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "model.eqx", "summary.json", "report"}
    pngs = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/loss.png", "report/optimizer.png", "report/report.txt"} <= pngs, pngs
    assert not (wd / "report").exists()  # rendered aside: the workdir holds what it held
    p = run_cli(f"--workdir={wd}", *FAST, "--max_steps=16", "--tensorboard",
                f"--mlflow_uri={store}", "--checkpoint_every=8")
    assert p.returncode == 0, p.stderr[-3000:]
    said = re.search(r"resumed from checkpoint step (\d+) \(phase (\w+), epoch (\d+), data "
                     r"position \{'next_index': (\d+)\}\)", p.stderr)
    assert said and said.groups() == ("12", "train", "1", "12"), p.stderr[-3000:]
    assert len(client.search_runs([run.info.experiment_id])) == 2


def _hide(tmp_path, module):
    """An environment in which ``import module`` fails, as if it were not installed."""
    shadow = tmp_path / "shadow"
    shadow.mkdir(exist_ok=True)
    (shadow / f"{module}.py").write_text(f"raise ImportError('No module named {module}')\n")
    return {"PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}


@pytest.mark.parametrize("flag, module", [("--tensorboard", "tensorboardX"),
                                          ("--mlflow_uri=sqlite:///x.db", "mlflow")])
def test_a_missing_extra_is_one_line_and_leaves_nothing(tmp_path, flag, module):
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", *FAST, flag, env=_hide(tmp_path, module))
    assert_one_line_error(p, module, "pip install")
    assert not wd.exists()


@pytest.mark.parametrize("uri", ["bogus://x", "http://127.0.0.1:9", "FOLDER"])
def test_an_unusable_mlflow_store_is_one_line_and_leaves_nothing(tmp_path, uri):
    pytest.importorskip("mlflow")  # the test extra installs it
    uri = str(tmp_path / "mlruns") if uri == "FOLDER" else uri  # MLflow's retired file store
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", *FAST, f"--mlflow_uri={uri}")
    assert_one_line_error(p, f"--mlflow_uri={uri}", "sqlite:///")
    assert sorted(os.listdir(tmp_path)) == []  # no workdir, and no store folder either


# ------------------------------------------------------------------------ terminal (3)


def test_under_a_terminal_logs_and_the_bar_never_share_a_line(tmp_path):
    """A real pty: log lines are written above the tqdm bar, the bar ends at --max_steps."""
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "distributed.train", f"--workdir={wd}",
           *[a for a in FAST if not a.startswith("--progress")], "--progress=auto",
           "--max_steps=10", "--log_every=2"]
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execve(sys.executable, cmd, cli_env())
    out, deadline = b"", time.monotonic() + 240
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 1.0)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out[-3000:]
    text = out.decode(errors="replace")
    frames = re.split(r"[\r\n]", text)
    assert any("10/10" in f for f in frames), text[-2000:]  # the bar's total is --max_steps
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING)")
    for frame in frames:  # no log line glued to a bar frame
        m = stamp.search(frame)
        assert not m or m.start() == 0 or not frame[:m.start()].strip(), repr(frame)
    assert "done: step 10" in text
    assert "val_loss=" in text  # validation shows up as it comes


def test_steps_and_epochs_in_metrics_jsonl(tmp_path):
    wd = tmp_path / "run"
    assert run_cli(f"--workdir={wd}", *FAST).returncode == 0
    recs = metrics(wd)
    epochs = [r for r in recs if r.get("event") == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all("train_loss" in r and "val_loss" in r for r in epochs)
    assert Path(wd / "logs" / "process-0.log").read_text().count(" INFO ") > 3
