"""Bad input, end to end: one test per row of README.md's bad-input table (rows already covered by
tests/test_cli.py are named there, not repeated here).

Each bad input must end with exit code 2 (or the documented one), ONE `error:` line naming the
value and the fix, no traceback, and nothing left that looks like a result or a checkpoint.
"""

import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from cli import ROOT, assert_one_line_error, run_cli, summary

FAST = ["--model=mlp", "--host_devices=8", "--progress=none"]


def assert_nothing_valid(wd, existed=False, steps_before=None):
    """No result, and no checkpoint or config that was not there before."""
    wd = Path(wd)
    assert not (wd / "summary.json").exists()
    ck = wd / "checkpoints"
    steps = sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []
    if not existed:
        assert not (wd / "config.json").exists()
        assert not any(s[:1].isdigit() for s in steps), steps
    if steps_before is not None:
        assert steps == steps_before


# ----------------------------------------------------------------- flags and config (3-19)

FLAG_ROWS = {
    "bool": (["--async_checkpoint=maybe"], ["--async_checkpoint=maybe", "Non-boolean"]),
    "checkpoint_every": (["--checkpoint_every=-1"], ["--checkpoint_every=-1", ">= 0"]),
    "watchdog_s": (["--watchdog_s=-1"], ["--watchdog_s=-1", ">= 0"]),
    "lr_reduction": (["--lr_reduction=2"], ["--lr_reduction=2", "(0, 1]"]),
    "positional": (["foo"], ["['foo']", "--flag=value"]),
    "grad_accum": (["--batch_size=64", "--grad_accum=3"], ["--batch_size=64", "--grad_accum=3"]),
    "mesh_malformed": (["--mesh=data=2"], ["data=2", "axis:size", "data:-1"]),
    "batch_too_big": (["--batch_size=1024", "--n_train=512"],
                      ["--batch_size=1024", "512 examples", "at most 512"]),
    "process_id": (["--coordinator_address=127.0.0.1:9", "--num_processes=2",
                    "--process_id=5"], ["--process_id=5", "--num_processes=2"]),
}


@pytest.mark.parametrize("row", list(FLAG_ROWS))
def test_flag_and_config_errors(tmp_path, row):
    args, needles = FLAG_ROWS[row]
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", *FAST, *args)
    assert_one_line_error(p, *needles)
    assert_nothing_valid(wd)


def test_empty_workdir(tmp_path):
    p = run_cli("--workdir=", *FAST)
    assert_one_line_error(p, "--workdir is empty", "runs/my_run")


def test_host_devices_flag_wins_over_xla_flags(tmp_path):
    """Not an error: --host_devices=8 replaces XLA_FLAGS's count of 4 (the mesh error below
    reports the device count in effect, without training)."""
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", *FAST, "--mesh=data:3",
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert_one_line_error(p, "8 are available")
    assert_nothing_valid(wd)


def test_unreachable_coordinator(tmp_path):
    wd = tmp_path / "run"
    t0 = time.monotonic()
    p = run_cli(f"--workdir={wd}", *FAST, "--coordinator_address=127.0.0.1:9",
                "--num_processes=2", "--process_id=1", "--init_timeout_s=2")
    assert_one_line_error(p, "127.0.0.1:9", "within 2 s", "Is process 0 running")
    assert time.monotonic() - t0 < 60
    assert_nothing_valid(wd)


ENV_ROWS = {
    "host_devices_env": ({"DISTRIBUTED_HOST_DEVICES": "abc"}, False,
                         ["DISTRIBUTED_HOST_DEVICES", "'abc'", "positive integer"]),
    "partial_env": ({"DISTRIBUTED_NUM_PROCESSES": "2"}, True,
                    ["DISTRIBUTED_COORDINATOR_ADDRESS", "DISTRIBUTED_PROCESS_ID"]),
}


@pytest.mark.parametrize("row", list(ENV_ROWS))
def test_environment_errors(tmp_path, row):
    env, with_flag, needles = ENV_ROWS[row]
    wd = tmp_path / "run"
    args = FAST if with_flag else [a for a in FAST if not a.startswith("--host_devices")]
    p = run_cli(f"--workdir={wd}", *args, env=env)
    assert_one_line_error(p, *needles)
    assert_nothing_valid(wd)


# ------------------------------------------------------------------------- data (23-25)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _data_file(tmp_path, row):
    rng = np.random.default_rng(0)
    y = rng.normal(size=(256, 2)).astype(np.float32)
    path = tmp_path / f"{row}.npz"
    if row == "int_features":
        np.savez(path, x=rng.integers(0, 5, size=(256, 8)), y=y)
    elif row == "empty":
        np.savez(path, x=np.zeros((0, 8), np.float32), y=np.zeros((0, 2), np.float32))
    elif row == "features_3d":
        np.savez(path, x=rng.normal(size=(256, 4, 2)).astype(np.float32), y=y)
    elif row == "pickled_objects":
        np.savez(path, x=np.array([_Payload(tmp_path / "pwned")] * 256, dtype=object), y=y)
    return path


DATA_ROWS = {
    "int_features": ["'x'", "int64", ".astype(np.float32)"],
    "empty": ["0 examples", "at least one example"],
    "pickled_objects": ["allow_pickle=False", "without object arrays"],
    "features_3d": ["'x'", "(256, 4, 2)", "2-D"],
}


@pytest.mark.parametrize("row", list(DATA_ROWS))
def test_bad_data(tmp_path, row):
    path = _data_file(tmp_path, row)
    wd = tmp_path / "run"
    p = run_cli(f"--workdir={wd}", *FAST, f"--data={path}", "--batch_size=32")
    assert_one_line_error(p, str(path), *DATA_ROWS[row])
    assert_nothing_valid(wd)
    assert not (tmp_path / "pwned").exists()  # the pickle was never executed


# ------------------------------------------------------------------ workdir (26-29, 32)


def _workdir_case(tmp_path, row):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a folder")
    if row == "is_a_file":
        return afile, [], ["exists and is not a folder"]
    if row == "parent_is_a_file":
        return afile / "run", [], ["cannot be created", "writable folder"]
    wd = tmp_path / "run"
    if row == "garbled_config":
        wd.mkdir()
        (wd / "config.json").write_text("{garbage")
        return wd, [], ["config.json is not a valid config", "--force"]
    if row == "foreign_files":
        (wd / "checkpoints").mkdir(parents=True)
        (wd / "checkpoints" / "notes.txt").write_text("mine")
        return wd, ["--restart_from_scratch"], ["notes.txt", "move them away"]
    raise AssertionError(row)


@pytest.mark.parametrize("row", ["is_a_file", "parent_is_a_file", "garbled_config",
                                 "foreign_files"])
def test_workdir_errors(tmp_path, row):
    wd, args, needles = _workdir_case(tmp_path, row)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    p = run_cli(f"--workdir={wd}", *FAST, *args)
    assert_one_line_error(p, f"{wd}", *needles)
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert after == before  # nothing written, nothing deleted
    if row == "garbled_config":
        assert (wd / "config.json").read_text() == "{garbage"


# ------------------------------------------------------------------ checkpoints (30, 31)

BASE = [*FAST, "--epochs=1", "--n_train=256", "--n_val=64", "--batch_size=64",
        "--checkpoint_every=2"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A short run with checkpoints at steps 2 and 4."""
    wd = tmp_path_factory.mktemp("base") / "run"
    p = run_cli(f"--workdir={wd}", *BASE)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(d.name for d in (wd / "checkpoints").iterdir()) == ["2", "4"]
    (wd / "summary.json").unlink()
    return wd


@pytest.mark.slow
def test_no_valid_checkpoint_is_an_error_until_restart_from_scratch(tmp_path, base_run):
    wd = tmp_path / "run"
    shutil.copytree(base_run, wd)
    for step in ("2", "4"):
        (wd / "checkpoints" / step / "metadata" / "metadata").write_text('{"step": ')
    p = run_cli(f"--workdir={wd}", *BASE)
    err = assert_one_line_error(p, f"--workdir={wd}", "No usable checkpoint", "step 4",
                                "step 2", "--restart_from_scratch")
    assert err == p.stderr.strip().splitlines()[-1]
    assert re.search(r"WARNING checkpoint step 4 .* incomplete or corrupt", p.stderr)
    assert_nothing_valid(wd, existed=True, steps_before=["2", "4"])
    # the fix named in the message works, and starts over for real
    p = run_cli(f"--workdir={wd}", *BASE, "--restart_from_scratch")
    assert p.returncode == 0, p.stderr[-3000:]
    assert summary(wd)["resumed_from_step"] is None and summary(wd)["final_step"] == 4


@pytest.mark.slow
def test_checkpoints_of_another_model(tmp_path, base_run):
    wd = tmp_path / "run"
    shutil.copytree(base_run, wd)
    rng = np.random.default_rng(0)
    data = tmp_path / "five.npz"
    np.savez(data, x=rng.normal(size=(256, 5)).astype(np.float32),
             y=rng.normal(size=(256, 2)).astype(np.float32))
    p = run_cli(f"--workdir={wd}", *BASE, f"--data={data}", "--batch_size=32", "--force")
    assert_one_line_error(p, f"--workdir={wd}", "another model", "(64, 8)", "(64, 5)",
                          "--restart_from_scratch")
    assert_nothing_valid(wd, existed=True, steps_before=["2", "4"])


# ----------------------------------------------------------------------- workdir `..` (33)


@pytest.mark.slow
def test_dotdot_workdir_writes_only_inside_it(tmp_path):
    p = run_cli(f"--workdir={tmp_path}/a/../b", *BASE, "--max_steps=2")
    assert p.returncode == 0, p.stderr[-3000:]
    top = sorted(x.name for x in tmp_path.iterdir())
    assert top == ["b"], top  # no stray "a", nothing next to the workdir
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= {
        x.name for x in (tmp_path / "b").iterdir()}


# ----------------------------------------------------------------------- the table itself


def test_every_row_names_an_existing_test():
    doc = (ROOT / "README.md").read_text()
    table = doc[doc.index("### The table"):doc.index("### Reliability in one paragraph")]
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) >= 15
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        refs = re.findall(r"`(tests/[\w/]+\.py)::(\w+)(?:\[([^\]]*)\])?`", row.split("|")[-2])
        assert refs, row
        for path, name, param in refs:
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), (path, name)
            if param and path.endswith("test_bad_inputs.py"):
                assert f'"{param}"' in source, (name, param)
            elif param:
                assert param.split("=")[0] in source, (path, param)
