"""Launchers: launch/local.py (real multi-process jax), launch/tpu_pod.sh (dry run), and
launch/slurm.sbatch on a real one-node SLURM cluster (tests/slurm_cluster.sh)."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = [sys.executable, str(ROOT / "launch" / "local.py")]
ALLGATHER = str(ROOT / "tests" / "programs" / "allgather.py")
TPU_POD = str(ROOT / "launch" / "tpu_pod.sh")
SBATCH_SCRIPT = str(ROOT / "launch" / "slurm.sbatch")
CLUSTER = str(ROOT / "tests" / "slurm_cluster.sh")
WIRING = (
    "DISTRIBUTED_COORDINATOR_ADDRESS",
    "DISTRIBUTED_NUM_PROCESSES",
    "DISTRIBUTED_PROCESS_ID",
    "DISTRIBUTED_HOST_DEVICES",
)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WIRING}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def allgather_line(output: str, prefix: str, index: int) -> str:
    pat = (
        rf"^{re.escape(prefix)}ALLGATHER process={index} count=2 local=2 global=4 "
        r"gathered=0,1 via=\w+$"
    )
    hits = re.findall(pat, output, flags=re.M)
    assert len(hits) == 1, f"no line like {pat!r} in:\n{output}"
    return hits[0]


# --------------------------------------------------------------------------- launch/local.py


def test_local_two_processes_allgather():
    r = subprocess.run(
        [*LOCAL, "--processes=2", "--devices_per_process=2", "--", sys.executable, ALLGATHER],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for i in (0, 1):
        assert allgather_line(r.stdout, f"[p{i}] ", i).endswith("via=env")
    body = [line for line in r.stdout.splitlines() if not line.startswith("[local] ")]
    assert body and all(re.match(r"\[p[01]\] ", line) for line in body), r.stdout


CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    i = int(os.environ["DISTRIBUTED_PROCESS_ID"])
    mode = sys.argv[1]
    open(os.path.join(sys.argv[2], f"pid{i}"), "w").write(str(os.getpid()))
    print("env", i, os.environ["DISTRIBUTED_NUM_PROCESSES"], os.environ["JAX_PLATFORMS"],
          os.environ["XLA_FLAGS"], os.environ["DISTRIBUTED_COORDINATOR_ADDRESS"], flush=True)
    if mode == "fail" and i == 1:
        time.sleep(0.5)
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if i == 1:
            time.sleep(0.5)
            sys.exit(5)
    if mode == "usr1":
        def handler(sig, frame):
            print("got", signal.Signals(sig).name, flush=True)
            sys.exit(42)
        signal.signal(signal.SIGUSR1, handler)
        print("ready", flush=True)
    time.sleep(60)
    """
)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie of an exited child is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def run_child(mode: str, tmp_path, *launcher_args):
    t0 = time.monotonic()
    r = subprocess.run(
        [
            *LOCAL,
            "--processes=2",
            "--devices_per_process=3",
            *launcher_args,
            "--",
            sys.executable,
            "-c",
            CHILD,
            mode,
            str(tmp_path),
        ],
        env=clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 --foo"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return r, time.monotonic() - t0


GLOO_SPLIT = textwrap.dedent(
    """
    import os, sys
    for rank in (0, 2):
        os.write(2, b"[Gloo] Rank %d is connected to 1 peer ranks. " % rank)
        os.write(1, b"HELLO from the program %d\\n" % rank)  # lands inside gloo's line
        os.write(2, b"Expected number of connected peer ranks is : 1\\n")
    """
)


def test_local_gloo_lines_fold_without_eating_the_programs_output():
    r = subprocess.run(
        [*LOCAL, "--processes=1", "--", sys.executable, "-c", GLOO_SPLIT],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[Gloo] connected to its peers") == 1, r.stdout
    assert "peer ranks" not in r.stdout.replace("[Gloo] connected to its peers", ""), r.stdout
    for rank in (0, 2):
        assert re.search(rf"^\[p0\] HELLO from the program {rank}$", r.stdout, flags=re.M), r.stdout


def test_local_failure_stops_the_others(tmp_path):
    r, took = run_child("fail", tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    assert took < 15
    assert "[local] process 1 failed with exit code 3" in r.stdout
    pid0 = int((tmp_path / "pid0").read_text())
    assert pid_gone(pid0)
    # the wiring every child got
    m = re.search(r"^\[p1\] env 1 2 cpu (.*) (127\.0\.0\.1:\d+)$", r.stdout, flags=re.M)
    assert m, r.stdout
    assert m.group(1).split() == ["--foo", "--xla_force_host_platform_device_count=3"]


def test_local_sigkill_after_grace(tmp_path):
    r, took = run_child("stubborn", tmp_path, "--grace=1")
    assert r.returncode == 5, r.stdout + r.stderr
    assert "killing the rest" in r.stdout
    assert took < 15
    assert pid_gone(int((tmp_path / "pid0").read_text()))


def test_local_forwards_sigusr1(tmp_path):
    p = subprocess.Popen(
        [*LOCAL, "--processes=2", "--", sys.executable, "-c", CHILD, "usr1", str(tmp_path)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in p.stdout:
        lines.append(line)
        if sum("ready" in x for x in lines) == 2:
            break
    p.send_signal(signal.SIGUSR1)
    out, _ = p.communicate(timeout=30)
    out = "".join(lines) + out
    assert p.returncode == 42, out
    assert "[p0] got SIGUSR1" in out and "[p1] got SIGUSR1" in out


def test_local_peer_killed_while_other_hangs():
    """p0 (the coordinator) hangs after the all-gather; the test kill -9s p1. jax alone would let
    p0 notice only after its 100 s heartbeat timeout; local.py must end everything quickly."""
    p = subprocess.Popen(
        [
            *LOCAL,
            "--processes=2",
            "--devices_per_process=2",
            "--grace=3",
            "--",
            sys.executable,
            ALLGATHER,
            "--hang=0",
        ],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read():
        for line in p.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 90
    pid1 = None
    while time.monotonic() < deadline:
        text = "".join(lines)
        m = re.search(r"^\[p1\] PID process=1 pid=(\d+)$", text, flags=re.M)
        if m and "[p0] HANGING process=0" in text and "[p1] ALLGATHER" in text:
            pid1 = int(m.group(1))
            break
        if p.poll() is not None:
            break
        time.sleep(0.1)
    assert pid1, "".join(lines)
    t0 = time.monotonic()
    os.kill(pid1, signal.SIGKILL)
    try:
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    reader.join(5)
    assert rc == 128 + signal.SIGKILL, "".join(lines)
    assert time.monotonic() - t0 < 60
    assert "[local] process 1 failed with exit code 137" in "".join(lines)


def test_local_usage_errors():
    r = subprocess.run([*LOCAL, "--processes=2"], capture_output=True, text=True)
    assert r.returncode == 2 and "missing the command" in r.stderr
    r = subprocess.run([*LOCAL, "--processes=2", "--", "no-such-command-here"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "'no-such-command-here' was not found" in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- launch/tpu_pod.sh


def tpu_pod(*args, env=None):
    return subprocess.run([TPU_POD, *args], capture_output=True, text=True, timeout=60, env=env)


def remote_commands(stdout: str) -> list[list[str]]:
    """The --command=... of each printed `gcloud ... ssh` line, split into words."""
    return [shlex.split(shlex.split(line)[-1].split("=", 1)[1])
            for line in stdout.strip().splitlines() if " ssh " in line]


def test_tpu_pod_help_exits_0():
    r = tpu_pod("--help")
    assert r.returncode == 0 and r.stderr == ""
    assert "--setup" in r.stdout and "--package=SPEC" in r.stdout and "not on PyPI" in r.stdout


def test_tpu_pod_dry_run_installs_a_wheel_of_this_checkout():
    train_args = ["--workdir=/mnt/shared/run 1", "--mesh=data:-1,fsdp:4", "--note=it's"]
    r = tpu_pod("--tpu=my-pod", "--zone=us-central2-b", "--project=proj", "--setup",
                "--dry-run", "--", *train_args)
    assert r.returncode == 0, r.stderr
    build, copy, install, train = r.stdout.strip().splitlines()
    wheel = "jax_bcd_distributed-0.1.0-py3-none-any.whl"
    assert shlex.split(build)[:6] == ["python3", "-m", "pip", "wheel", "--no-deps", "-q"]
    assert shlex.split(build)[-1] == str(ROOT)
    assert shlex.split(copy)[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert shlex.split(copy)[5].endswith("/" + wheel) and f"my-pod:{wheel}" in copy
    assert copy.endswith("--zone=us-central2-b --project=proj --worker=all")
    head = ("gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --project=proj "
            "--worker=all --command=")
    assert install.startswith(head) and train.startswith(head)
    remote = remote_commands(r.stdout)
    assert remote[0] == ["python3", "-m", "pip", "install", "-U", f"./{wheel}[tpu]", "&&",
                         "python3", "-m", "pip", "install", "--no-deps", "--force-reinstall",
                         f"./{wheel}[tpu]"]
    assert remote[1] == ["python3", "-m", "distributed.train", *train_args]


def test_tpu_pod_package_specs(tmp_path):
    wheel = tmp_path / "mine-2.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    r = tpu_pod("--tpu=t", "--zone=z", "--setup", f"--package={wheel}[tpu]", "--python=py3.12",
                "--dry-run")
    assert r.returncode == 0, r.stderr
    copy = r.stdout.splitlines()[0]
    assert shlex.split(copy)[5:7] == [str(wheel), f"t:{wheel.name}"]
    assert remote_commands(r.stdout)[0][:5] == ["py3.12", "-m", "pip", "install", "-U"]
    assert remote_commands(r.stdout)[0][5] == f"./{wheel.name}[tpu]"
    git = "jax-bcd-distributed[tpu] @ git+https://github.com/o/r.git@v1"
    r = tpu_pod("--tpu=t", "--zone=z", "--setup", f"--package={git}", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 2  # no build, no copy
    assert remote_commands(r.stdout)[0][5] == git


def test_tpu_pod_runs_gcloud(tmp_path):
    """Not a dry run: a fake gcloud on PATH records what it is asked to do."""
    (tmp_path / "gcloud").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$CALLS"\n')
    (tmp_path / "gcloud").chmod(0o755)
    wheel = tmp_path / "mine-2.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "CALLS": str(tmp_path / "calls")}
    r = tpu_pod("--tpu=t", "--zone=z", "--setup", f"--package={wheel}", "--", "--x=a b",
                env=env)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == f"compute tpus tpu-vm scp {wheel} t:{wheel.name} --zone=z --worker=all"
    assert calls[1].startswith("compute tpus tpu-vm ssh t --zone=z --worker=all --command=")
    assert shlex.split(calls[2].split("--command=", 1)[1]) == [
        "python3", "-m", "distributed.train", "--x=a b"]


def test_tpu_pod_usage_errors():
    for args, words in [(["--zone=z", "--dry-run", "--", "--x"], "missing --tpu"),
                        (["--tpu=t", "--dry-run"], "missing --zone"),
                        (["--tpu=t", "--zone=z", "--package=x"], "--package=x needs --setup"),
                        (["--tpu=t", "--zone=z", "--batch_size=8"], "unknown option")]:
        r = tpu_pod(*args)
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


# --------------------------------------------------------------------------- real SLURM


@pytest.fixture(scope="module")
def slurm():
    """A one-node SLURM cluster (tests/slurm_cluster.sh up); torn down if this fixture started
    it. Skipped only where it cannot be installed: not root, or no apt-get and no SLURM."""
    have_slurm = all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged"))
    if os.geteuid() != 0:
        pytest.skip("real SLURM test needs root (to run munged/slurmctld/slurmd)")
    if not have_slurm and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is unavailable to install it")
    was_up = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    t0 = time.monotonic()
    r = subprocess.run([CLUSTER, "up"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"\nslurm_cluster.sh up: {time.monotonic() - t0:.1f} s (was up: {was_up})")
    conf = r.stdout.strip().splitlines()[-1].split("=", 1)[1]
    yield {"SLURM_CONF": conf}
    if not was_up:
        subprocess.run([CLUSTER, "down"], capture_output=True, timeout=120)


def slurm_env(slurm, **extra):
    values = dict(
        PYTHON=sys.executable,
        DISTRIBUTED_CPU_DEVICES_PER_TASK=2,
        DISTRIBUTED_ENTRYPOINT=ALLGATHER,
        PYTHONPATH=ROOT,
    )
    env = clean_env(**slurm, **{**values, **extra})
    env.pop("WORKDIR", None)
    return env


SBATCH_CPU = [
    "--nodes=1",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=3",
]


def submit(slurm, tmp_path, *args, **env) -> str:
    r = subprocess.run(
        ["sbatch", "--parsable", *SBATCH_CPU, f"--output={tmp_path}/job-%j.out", *args],
        cwd=tmp_path,
        env=slurm_env(slurm, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().split(";")[0]


def wait_job(slurm, job: str, timeout: float) -> tuple[str, str]:
    """(JobState, ExitCode) once the job has ended. Polls scontrol: `sbatch --wait` polls with
    growing intervals and may return tens of seconds after a short job ended."""
    deadline = time.monotonic() + timeout
    fields = {}
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["scontrol", "-o", "show", "job", job],
            env=slurm_env(slurm),
            capture_output=True,
            text=True,
        )
        fields = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
        if fields.get("JobState") in (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
        ):
            return fields["JobState"], fields.get("ExitCode", "?")
        time.sleep(0.25)
    subprocess.run(["scancel", job], env=slurm_env(slurm))
    raise AssertionError(f"job {job} did not end within {timeout} s: {fields.get('JobState')}")


@pytest.mark.slow
def test_slurm_sbatch_two_tasks(slurm, tmp_path):
    t0 = time.monotonic()
    job = submit(slurm, tmp_path, "--job-name=allgather", SBATCH_SCRIPT, "--extra=ignored")
    state, code = wait_job(slurm, job, 240)
    print(f"sbatch job (submit to end): {time.monotonic() - t0:.1f} s")
    out_file = tmp_path / f"job-{job}.out"
    out = out_file.read_text() if out_file.exists() else "<no output file>"
    assert (state, code) == ("COMPLETED", "0:0"), out
    # The job state is not proof that the job ran: check what the tasks printed.
    for i in (0, 1):
        assert allgather_line(out, f"{i}: ", i).endswith("via=slurm")
    assert "[slurm.sbatch] done" in out
    # the default workdir: $SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME
    assert sorted(p.name for p in (tmp_path / "runs" / "allgather").iterdir()) == [
        "allgather-p0.json",
        "allgather-p1.json",
    ]


# The real command line: 4 steps per epoch x 3 BCD phases, 2 simulated devices per task.
TINY_TRAIN = [
    "--n_train=128",
    "--n_val=32",
    "--n_test=32",
    "--batch_size=32",
    "--epochs_param=1",
    "--epochs_nonparam=1",
    "--epochs_complete=1",
    "--log_every=1",
    "--progress=log",
]


@pytest.mark.slow
def test_slurm_sbatch_trains_with_the_cli(slurm, tmp_path):
    """launch/slurm.sbatch runs `python -m distributed.train` in 2 srun tasks that join one
    jax.distributed run (auto-detected SLURM), train, and write the outputs once."""
    t0 = time.monotonic()
    job = submit(
        slurm,
        tmp_path,
        "--job-name=train",
        "--time=15",
        SBATCH_SCRIPT,
        *TINY_TRAIN,
        DISTRIBUTED_ENTRYPOINT="distributed.train",
    )
    state, code = wait_job(slurm, job, 900)
    print(f"sbatch training job (submit to end): {time.monotonic() - t0:.1f} s")
    out_file = tmp_path / f"job-{job}.out"
    out = out_file.read_text() if out_file.exists() else "<no output file>"
    assert (state, code) == ("COMPLETED", "0:0"), out
    # The job state is not proof that the job ran: check what the tasks printed (process 0
    # on the console, every process in its log file in the workdir).
    wd = tmp_path / "runs" / "train"  # the default: $SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME
    for i in (0, 1):
        pat = (
            rf"\[distributed\] process {i}/2 platform=cpu local_devices=2 "
            r"global_devices=4 .*via=slurm$"
        )
        log_text = (wd / "logs" / f"process-{i}.log").read_text()
        assert re.search(pat, log_text, flags=re.M), log_text
    assert re.search(r"^0: .*\[distributed\] process 0/2 .*via=slurm$", out, flags=re.M), out
    assert not re.search(r"^1: .* INFO ", out, flags=re.M), out  # INFO: process 0 only
    done = re.findall(r"^(\d+): .* done: step (\d+),", out, flags=re.M)
    assert done == [("0", "12")], out
    assert "[slurm.sbatch] done" in out
    # the outputs are written by process 0 only
    assert sorted(p.name for p in wd.iterdir()) == [
        "checkpoints",
        "config.json",
        "logs",
        "metrics.jsonl",
        "model.eqx",
        "summary.json",
    ]
    s = json.loads((wd / "summary.json").read_text())
    assert (s["process_count"], s["device_count"], s["final_step"]) == (2, 4, 12), s
    recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 8, 12]


def _wait_for(pred, what: str, timeout: float, out_file: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out_file.read_text() if out_file.exists() else ""
        if pred(text):
            return text
        time.sleep(0.25)
    raise AssertionError(
        f"timed out waiting for {what}; output:\n"
        + (out_file.read_text() if out_file.exists() else "<none>")
    )


@pytest.mark.slow
def test_slurm_preemption_signal_requeues(slurm, tmp_path):
    """SIGUSR1 to the batch script (what --signal=B:USR1@120 does) reaches every task; the
    program exits 42 as after a preemption save; the script requeues; the rerun finishes."""
    env = slurm_env(slurm)
    job = submit(slurm, tmp_path, "--job-name=preempt", SBATCH_SCRIPT, "--preempt_first_run")
    out_file = tmp_path / f"job-{job}.out"
    try:
        _wait_for(
            lambda t: len(re.findall(r"^[01]: WAITING", t, flags=re.M)) == 2,
            "both tasks to wait for the signal",
            120,
            out_file,
        )
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True)
        _wait_for(lambda t: "requeueing job" in t, "the requeue", 60, out_file)
        # The rerun starts once the old credential expired (cred_expire=10 in slurm_cluster.sh).
        state, code = wait_job(slurm, job, 180)
        text = out_file.read_text()
        assert (state, code) == ("COMPLETED", "0:0"), text
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    assert re.search(r"^0: PREEMPTED process=0 signal=True$", text, flags=re.M), text
    assert re.search(r"^1: PREEMPTED process=1 signal=True$", text, flags=re.M), text
    assert "step ended with 42 (preempted or stalled)" in text
    assert "restart 1:" in text and "[slurm.sbatch] done" in text
    assert len(re.findall(r"^0: ALLGATHER process=0", text, flags=re.M)) == 2
