"""Reliability: preemption, crash-anywhere resume, corrupt checkpoints, the hang watchdog, the
goodput ledger, and loading without unpickling.

The end-to-end tests run the real command line in subprocesses (8 simulated CPU devices, the
small mlp config: 512 examples / batch 64 = 8 steps per epoch, 3 epochs = 24 steps). They share
a persistent jax compilation cache, so each run costs its start-up (~5 s), not a recompile.
The fast in-process tests at the end cover the pieces (StopRequest, the loop's stop point, the
Watchdog, the lost-work reader).
"""

import glob
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import ROOT, cli_env, metrics, summary

from distributed.runtime.goodput import Ledger, read_previous_attempt
from distributed.runtime.signals import PREEMPTED_EXIT_CODE, StopRequest
from distributed.runtime.watchdog import STALLED as WATCHDOG_EXIT_CODE
from distributed.runtime.watchdog import Watchdog

MLP = ["--model=mlp", "--epochs=3", "--n_train=512", "--n_val=64", "--batch_size=64",
       "--log_every=1", "--checkpoint_every=2", "--progress=log", "--host_devices=8"]
STEPS = 24
MLP_2P = [a for a in MLP if not a.startswith("--host_devices")]  # the launcher sets devices

# ------------------------------------------------------------------------------ helpers


class Proc:
    """A subprocess whose merged stdout/stderr is read line by line in the background."""

    def __init__(self, cmd, env):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, cwd=ROOT, env=env, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self):
        for line in self.p.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern, timeout=240.0):
        """The first line matching `pattern` (its arrival time, text), or None at exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for t, line in self.lines[seen:]:
                    if rx.search(line):
                        return t, line
                seen = len(self.lines)
                if self.p.poll() is not None and not self._reader.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r} in {timeout} s:\n"
                                         + self.text()[-3000:])
                self._cond.wait(min(left, 0.5))

    def wait(self, timeout=240.0):
        try:
            rc = self.p.wait(timeout=timeout)
        finally:
            self.kill()
        self._reader.join(timeout=10)
        return rc

    def kill(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)  # this test's own process group
            except ProcessLookupError:
                pass
            self.p.wait()

    def text(self):
        return "".join(line for _, line in self.lines)

    def index(self, pattern):
        """Index of the first line matching `pattern` (len(lines) if none)."""
        rx = re.compile(pattern)
        return next((i for i, (_, line) in enumerate(self.lines) if rx.search(line)),
                    len(self.lines))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return cli_env({"JAX_COMPILATION_CACHE_DIR": str(cache),
                    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})


def train(wd, *extra, env, extra_env=None):
    e = dict(env, **(extra_env or {}))
    return Proc([sys.executable, "-m", "distributed.train", f"--workdir={wd}", *MLP, *extra], e)


def launch2(wd, *extra, env, grace=10):
    cmd = [sys.executable, "launch/local.py", "--processes=2", "--devices_per_process=4",
           "--print_pids", f"--grace={grace}", "--", sys.executable, "-m", "distributed.train",
           f"--workdir={wd}", *MLP_2P, *extra]
    return Proc(cmd, env)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """The uninterrupted run: its params_sha256, and how long a run takes once compiled (a
    second run, from the warm compilation cache, which must give the same sha)."""
    out = []
    for _ in range(2):
        wd = tmp_path_factory.mktemp("reference") / "run"
        p = train(wd, env=env)
        rc = p.wait()
        assert rc == 0, p.text()[-3000:]
        s = summary(wd)
        assert s["final_step"] == STEPS and s["resumed_from_step"] is None
        out.append((s, time.monotonic() - p.t0))
    assert out[0][0]["params_sha256"] == out[1][0]["params_sha256"]
    return {"sha": out[1][0]["params_sha256"], "seconds": out[1][1], "summary": out[1][0]}


def committed_steps(wd):
    d = Path(wd) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def assert_ledger_adds_up(s, rel=0.05):
    g = s["goodput"]
    parts = sum(v for k, v in g.items() if k.endswith("_s") and k not in
                ("wall_s", "lost_s_on_restart"))
    assert abs(parts - g["wall_s"]) <= rel * g["wall_s"], json.dumps([parts, g])
    assert 0 < g["goodput"] <= 1


def preempt_ok(p, sent_at, *, sig_name="SIGTERM"):
    """The run ended with 42 within 30 s of the signal, after committing a checkpoint."""
    rc = p.wait(timeout=120)
    out = p.text()
    assert rc == PREEMPTED_EXIT_CODE, (rc, out[-3000:])
    took = time.monotonic() - sent_at
    assert took < 30, f"exit took {took:.1f} s after {sig_name}"
    m = re.search(rf"preempted \({sig_name}\): checkpoint at step (\d+) committed", out)
    assert m, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return int(m.group(1))


# ------------------------------------------------------------------------ preemption (1)


@pytest.mark.slow
def test_sigterm_at_five_moments_checkpoints_exits_42_and_resumes_exactly(env, reference,
                                                                         tmp_path):
    """One workdir, five preemptions in a row, each at a different moment, then the rest."""
    wd = tmp_path / "run"
    # A large validation set (it does not change the parameters) makes validation last long
    # enough (~1 s) for a signal sent on the "step 16" line to land inside it.
    val = "--n_val=16384"
    moments = [
        # (what, line to wait for, line the "received" log must come before)
        ("start-up", r"\[distributed\] process 0/1", r"INFO step \d+ "),
        ("first compilation", r"INFO mesh \{", r"INFO step \d+ "),
        ("between checkpoints", r"INFO step 3 ", None),
        ("an asynchronous save", r"checkpoint step (\d+): blocked", "commit"),
        ("validation", r"INFO step 16 ", r"INFO epoch 1 "),
    ]
    last = -1
    for what, trigger, before in moments:
        p = train(wd, val, env=env)
        hit = p.wait_for(trigger)
        assert hit is not None, (what, p.text()[-3000:])
        p.p.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        step = preempt_ok(p, sent)
        received = p.index(r"received SIGTERM")
        if before == "commit":  # the save was still in flight when the signal came
            saving = int(re.search(trigger, hit[1]).group(1))
            before = rf"checkpoint step {saving} committed"
        if before is not None:
            assert received < p.index(before), (what, p.text()[-3000:])
        assert step in committed_steps(wd), (what, step, committed_steps(wd))
        assert step >= last and max(committed_steps(wd)) == step, (what, step)
        assert not (wd / "summary.json").exists()
        last = step
    assert last == 16
    p = train(wd, val, env=env)
    assert p.wait() == 0, p.text()[-3000:]
    s = summary(wd)
    assert s["resumed_from_step"] == 16 and s["final_step"] == STEPS
    assert s["params_sha256"] == reference["sha"]
    assert_ledger_adds_up(s)


@pytest.mark.slow
def test_two_processes_agree_on_the_stop_step(env, tmp_path):
    """SIGUSR1 to the launcher: both processes stop at the same (all-gathered) step, exit 42."""
    wd = tmp_path / "run"
    p = launch2(wd, env=env)
    assert p.wait_for(r"\[p0\].*INFO step 3 ") is not None, p.text()[-3000:]
    p.p.send_signal(signal.SIGUSR1)
    sent = time.monotonic()
    rc = p.wait(timeout=120)
    out = p.text()
    assert rc == PREEMPTED_EXIT_CODE, (rc, out[-3000:])
    assert time.monotonic() - sent < 30
    stops = re.findall(r"\[p(\d)\].*preempted \(SIGUSR1\): checkpoint at step (\d+) committed",
                       out)
    assert sorted(i for i, _ in stops) == ["0", "1"], out[-3000:]
    assert len({s for _, s in stops}) == 1 and int(stops[0][1]) % 10 == 0  # sync_every=10
    p = launch2(wd, env=env)
    assert p.wait() == 0, p.text()[-3000:]
    assert summary(wd)["resumed_from_step"] == int(stops[0][1])


# ------------------------------------------------------------------- crash anywhere (2)


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume_is_exact(env, reference, tmp_path):
    """kill -9 at seeded random times after start (start-up, compile, restore, steps, saves);
    rerun until an attempt outlives its kill time. Every completed run has the reference sha."""
    rng = random.Random(20261122)
    kills, chain, attempts, wd = [], 0, 0, None

    def check_done(wd):
        s = summary(wd)
        assert s["final_step"] == STEPS
        assert s["params_sha256"] == reference["sha"], (wd, kills)

    while len(kills) < 5:
        attempts += 1
        assert attempts <= 25, kills
        if wd is None:
            chain += 1
            wd = tmp_path / f"run{chain}"
        at = rng.uniform(0.2, reference["seconds"])
        p = train(wd, env=env)
        try:
            rc = p.p.wait(timeout=at)
        except subprocess.TimeoutExpired:
            os.killpg(p.p.pid, signal.SIGKILL)
            p.wait()
            kills.append((chain, round(at, 2), committed_steps(wd)))
        else:
            p.wait()
            assert rc == 0, p.text()[-3000:]  # it finished before its kill time
            check_done(wd)
            wd = None
            continue
        # a kill leaves committed steps and interrupted temporaries (removed on the next run)
        ckpt = wd / "checkpoints"
        names = [d.name for d in ckpt.iterdir()] if ckpt.is_dir() else []
        assert all(n.isdigit() or ".orbax-checkpoint-tmp" in n for n in names), names
        if (wd / "summary.json").exists():  # killed while exiting, after it had finished
            check_done(wd)
            wd = None
    if wd is not None:
        p = train(wd, env=env)
        assert p.wait() == 0, p.text()[-3000:]
        check_done(wd)
    print(f"kills (chain, seconds after start, committed steps then): {kills}")


# ------------------------------------------------------------------ multi-process (4)


def _pids(p, n=2):
    pids = {}
    for i in range(n):
        hit = p.wait_for(rf"\[local\] process {i} pid (\d+)")
        pids[i] = int(re.search(r"pid (\d+)", hit[1]).group(1))
    return pids


@pytest.mark.slow
def test_dropout_run_killed_and_resumed_ends_with_the_uninterrupted_sha(env, reference,
                                                                        tmp_path):
    """The per-step keys come from the state's key and step: a resumed dropout run draws the
    masks the uninterrupted one drew."""
    ref = tmp_path / "ref"
    p = train(ref, "--dropout=0.2", env=env)
    assert p.wait() == 0, p.text()[-3000:]
    wd = tmp_path / "run"
    p = train(wd, "--dropout=0.2", env=env)
    assert p.wait_for(r"INFO step 11 ") is not None, p.text()[-3000:]
    p.kill()
    assert committed_steps(wd) and max(committed_steps(wd)) < STEPS
    p = train(wd, "--dropout=0.2", env=env)
    assert p.wait() == 0, p.text()[-3000:]
    s = summary(wd)
    assert s["resumed_from_step"] is not None and s["final_step"] == STEPS
    assert s["params_sha256"] == summary(ref)["params_sha256"]
    assert s["params_sha256"] != reference["sha"]  # dropout did change the training


@pytest.mark.slow
def test_two_processes_one_killed_both_end_with_a_clear_message(env, tmp_path):
    p = launch2(tmp_path / "run", "--watchdog_s=10", env=env)
    pids = _pids(p)
    assert p.wait_for(r"\[p0\].*INFO step 5 ") is not None, p.text()[-3000:]
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    rc = p.wait(timeout=120)
    out = p.text()
    assert time.monotonic() - killed < 60
    # p1's SIGKILL (137) is normally the first failure the launcher sees; process 0 then either
    # aborts at once (gloo notices the closed connection) or is stopped by the launcher.
    assert rc != 0, out[-3000:]
    assert re.search(r"\[local\] process [01] failed with exit code \d+; stopping the others",
                     out), out[-3000:]
    assert "Traceback" not in out
    for pid in pids.values():  # nobody is left behind
        assert not os.path.exists(f"/proc/{pid}")


@pytest.mark.slow
def test_frozen_peer_makes_the_watchdog_end_the_run_and_the_rerun_accounts_lost_work(env,
                                                                                   tmp_path):
    """A peer that stops answering (SIGSTOP: a hung node) leaves process 0 blocked in a
    collective; its watchdog dumps the stacks and exits 3 instead of hanging for jax's 100 s
    heartbeat timeout; the launcher then stops the frozen one. The rerun resumes from the last
    committed checkpoint and accounts the steps the stalled attempt had logged beyond it."""
    wd = tmp_path / "run"
    p = launch2(wd, "--watchdog_s=8", "--checkpoint_every=4", env=env, grace=5)
    pids = _pids(p)
    try:
        assert p.wait_for(r"\[p0\].*INFO step 7 ") is not None, p.text()[-3000:]
        os.kill(pids[1], signal.SIGSTOP)
        frozen = time.monotonic()
        rc = p.wait(timeout=120)
        out = p.text()
        assert time.monotonic() - frozen < 60
        assert rc == WATCHDOG_EXIT_CODE, (rc, out[-3000:])
        errors = [line for line in out.splitlines() if line.startswith("[p0] error: watchdog:")]
        assert len(errors) == 1, out[-3000:]
        assert "--watchdog_s=8" in errors[0] and "peer process may have died" in errors[0]
        assert "[p0] Thread 0x" in out or "[p0] Current thread" in out  # the stack dump
        assert (wd / "watchdog-p0.txt").exists()
    finally:
        try:
            os.kill(pids[1], signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (wd / "summary.json").exists()
    last_committed = max(committed_steps(wd))
    last_logged = max(r["step"] for r in metrics(wd) if "loss" in r)
    assert last_logged > last_committed

    p = launch2(wd, "--checkpoint_every=4", env=env)
    assert p.wait() == 0, p.text()[-3000:]
    s = summary(wd)
    assert s["resumed_from_step"] == last_committed and s["final_step"] == STEPS
    g = s["goodput"]
    assert g["lost_steps_on_restart"] == last_logged - last_committed
    assert g["lost_s_on_restart"] > 0
    assert g["previous_attempt_last_step"] == last_logged and g["restore_s"] > 0
    assert_ledger_adds_up(s)
    recs = metrics(wd)
    resumes = [r for r in recs if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["lost_steps"] == last_logged - last_committed
    steps = [r for r in recs if "loss" in r]
    assert all("goodput" in r and r["goodput"]["wall_s"] > 0 for r in steps)


# --------------------------------------------------------------- corrupt checkpoints (3)


@pytest.fixture(scope="module")
def base_12(env, tmp_path_factory):
    """A run stopped at step 12 with checkpoints at 4, 8 and 12."""
    wd = tmp_path_factory.mktemp("base12") / "run"
    p = train(wd, "--max_steps=12", "--checkpoint_every=4", env=env)
    assert p.wait() == 0, p.text()[-3000:]
    assert committed_steps(wd) == [4, 8, 12]
    return wd


def _truncate_array_file(step_dir):
    f = max(glob.glob(f"{step_dir}/state/ocdbt.process_*/d/*"), key=os.path.getsize)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)


def _delete_part_of_step(step_dir):
    shutil.rmtree(step_dir / "state" / "ocdbt.process_0")
    shutil.rmtree(step_dir / "data")


def _garble_metadata_json(step_dir):
    (step_dir / "metadata" / "metadata").write_text('{"step": 12, "phase": ')
    (step_dir / "state" / "_METADATA").write_text("\x00\x01 not json")


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [_truncate_array_file, _delete_part_of_step,
                                     _garble_metadata_json], ids=lambda f: f.__name__[1:])
def test_corrupt_latest_checkpoint_falls_back_and_resumes_exactly(env, reference, base_12,
                                                                   tmp_path, corrupt):
    wd = tmp_path / "run"
    shutil.copytree(base_12, wd)
    corrupt(wd / "checkpoints" / "12")
    p = train(wd, env=env)
    assert p.wait() == 0, p.text()[-3000:]
    out = p.text()
    warnings = [line for line in out.splitlines() if "WARNING" in line and "step 12" in line]
    assert any("incomplete or corrupt" in w for w in warnings), out[-3000:]
    assert any("moved the unusable checkpoint step 12 aside" in w for w in warnings)
    s = summary(wd)
    assert s["resumed_from_step"] == 8 and s["final_step"] == STEPS
    assert s["params_sha256"] == reference["sha"]
    assert (wd / "checkpoints" / "12.corrupt").is_dir()  # kept for inspection, not in the way


# ------------------------------------------------------------------ no unpickling (7)


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _payload_is_live(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload does run when unpickled
    assert probe.exists()


def test_model_checkpoint_file_holding_a_pickle_is_refused(tmp_path):
    from distributed.checkpoint.model_file import CheckpointError, load_checkpoint

    _payload_is_live(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "model.eqx"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint({"w": jnp.zeros(3)}, path)
    npz = tmp_path / "model.npz"
    np.savez(npz, w=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(CheckpointError):
        load_checkpoint({"w": jnp.zeros(3)}, npz)
    assert not marker.exists()


@pytest.mark.slow
def test_pickles_planted_in_checkpoints_are_never_executed(env, base_12, tmp_path):
    _payload_is_live(tmp_path)
    marker = tmp_path / "pwned"
    wd = tmp_path / "run"
    shutil.copytree(base_12, wd)
    bomb = pickle.dumps(_Payload(marker))
    ck = wd / "checkpoints"
    (ck / "12" / "metadata" / "metadata").write_bytes(bomb)
    (ck / "8" / "data" / "metadata").write_bytes(bomb)
    (ck / "4" / "state" / "_METADATA").write_bytes(bomb)
    for f in glob.glob(f"{ck}/4/state/ocdbt.process_0/d/*"):
        Path(f).write_bytes(bomb)
    p = train(wd, env=env)
    rc = p.wait()
    out = p.text()
    assert rc == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--restart_from_scratch" in errors[0], out[-3000:]
    assert not marker.exists()


# ------------------------------------------------------------------- fast, in-process


def test_stop_request_handles_the_three_signals():
    previous = signal.getsignal(signal.SIGUSR1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        stop = StopRequest().install()
        try:
            assert not stop.requested(0)
            os.kill(os.getpid(), sig)
            for _ in range(100):
                if stop.local:
                    break
                time.sleep(0.01)
            assert stop.requested(5) and stop.decided_at == 5 and stop.requested(6)
            assert stop.signal_name == signal.Signals(sig).name
            if sig != signal.SIGINT:  # a repeated SIGTERM/SIGUSR1 is ignored
                os.kill(os.getpid(), sig)
                time.sleep(0.05)
            else:  # a second Ctrl-C stops at once
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), sig)
                    time.sleep(0.5)
        finally:
            stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_stop_request_takes_back_a_replaced_handler():
    stop = StopRequest().install()
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # e.g. jax's preemption notifier
        stop.ensure_installed()
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    finally:
        stop.uninstall()


def test_loop_stops_before_fetching_the_next_batch(tmp_path):
    """The saved data position must match the saved step: no batch fetched and dropped."""
    from distributed.loop import run_loop
    from distributed.loop.callbacks import Hook

    fetched = []

    def data():
        for i in range(100):
            fetched.append(i)
            yield {"x": np.float32(i)}

    def step_fn(state, batch, key):
        return state + 1, {"loss": jnp.float32(batch["x"])}

    stop = StopRequest()
    hook = Hook(lambda info: stop.trigger() if info.step == 3 else None, every=1)
    state, result = run_loop(jnp.int32(0), step_fn, data_iterator=data(), num_epochs=2,
                             num_batches=10, hooks=[hook], stop=stop, show_progress=False)
    assert result.stopped_by == "preempted" and result.final_step == 3
    assert fetched == [0, 1, 2]
    assert result.history == {}  # no epoch-end work on the partial epoch


def test_watchdog_fires_unless_beaten_and_waits_for_compilation():
    fired = []
    wd = Watchdog(0.4, on_fire=fired.append).start()
    try:
        for _ in range(8):  # regular beats: no fire
            wd.beat("step")
            time.sleep(0.1)
        assert not fired
        jax.monitoring.record_scalar("/jax/core/compile/backend_compile_duration", 0.0)
        time.sleep(1.0)  # compiling: deadlines are suspended
        assert not fired
        jax.monitoring.record_event_duration_secs("/jax/core/compile/backend_compile_duration",
                                                  1.0)
        for _ in range(40):
            if fired:
                break
            time.sleep(0.05)
        assert fired and "'step' made no progress" in fired[0]
        assert "--watchdog_s=0.4" in fired[0]
    finally:
        wd.stop()
    off = Watchdog(0).start()  # disabled: no thread
    assert off._thread is None
    off.stop()


@pytest.mark.parametrize("where", ["data", "save"])
def test_the_loop_tells_the_watchdog_what_stalls(tmp_path, where):
    """A data fetch or a checkpoint save that never returns is named by the watchdog."""
    from distributed.checkpoint import CheckpointManager
    from distributed.loop import Checkpointer, run_loop

    release = threading.Event()

    def data():
        for i in range(100):
            if where == "data" and i == 4:
                release.wait(30)
            yield {"x": np.float32(i)}

    class StuckManager(CheckpointManager):
        def save(self, step, *args, **kwargs):
            if where == "save" and step == 4:
                release.wait(30)
            return super().save(step, *args, **kwargs)

    def step_fn(state, batch, key):
        return {"n": state["n"] + 1}, {"loss": jnp.float32(batch["x"])}

    fired = []

    def fire(msg):
        fired.append(msg)
        release.set()

    wd = Watchdog(0.5, on_fire=fire).start()
    ckpt = Checkpointer(StuckManager(tmp_path / "ckpt"), every_steps=4)
    try:
        run_loop({"n": jnp.int32(0)}, step_fn, data_iterator=data(), num_epochs=1,
                 num_batches=6, checkpointer=ckpt, show_progress=False, watchdog=wd)
    finally:
        wd.stop()
        ckpt.close()
    what = "data fetch for step 5" if where == "data" else "checkpoint save at step 4"
    assert len(fired) == 1 and f"'{what}' made no progress" in fired[0], fired


def test_read_previous_attempt_skips_torn_lines_and_uses_the_last_attempt(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": s, "loss": 1.0, "goodput": {"wall_s": 10.0 + s}} for s in range(1, 9)]
    recs.append({"step": 6, "event": "resume"})
    recs += [{"step": s, "loss": 1.0, "goodput": {"wall_s": 5.0 + 0.5 * s}} for s in (7, 8, 9)]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 10, "lo'  # killed mid-line
    path.write_text(text)
    prev = read_previous_attempt(path)
    assert prev == {"last_step": 9, "steps_per_sec": 2.0}
    assert read_previous_attempt(tmp_path / "none.jsonl") is None
    ledger = Ledger()
    try:
        ledger.previous = prev
        ledger.note_resume(6)
        assert ledger.lost_steps == 3 and ledger.lost_s == pytest.approx(1.5)
        assert ledger.resume_record()["previous_last_logged_step"] == 9
    finally:
        ledger.close()


def test_ledger_parts_never_overlap_nested_timers_or_other_threads_compiles():
    """The parts add up to at most the wall time: a timer nested in another (``restore`` inside
    ``setup``) counts once, and a compile on another thread (a checkpoint worker's) overlaps the
    timed thread's time, so it is not counted as the run's compile time."""

    ledger = Ledger()
    try:
        with ledger.timer("setup"):
            time.sleep(0.05)
            with ledger.timer("restore"):
                time.sleep(0.1)
                jax.jit(lambda x: x * 3 + 1).lower(jnp.ones(7)).compile()  # compiles here
        compiled = ledger.seconds["compile"]
        assert compiled > 0
        assert 0.1 <= ledger.seconds["restore"] < 0.1 + 0.05
        assert 0.05 <= ledger.seconds["setup"] < 0.05 + 0.05

        def other_thread():
            jax.jit(lambda x: x * 5 - 2).lower(jnp.ones(9)).compile()

        with ledger.timer("step"):
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
        assert ledger.seconds["compile"] == compiled
        snap = ledger.snapshot()
        parts = sum(v for k, v in snap.items() if k.endswith("_s") and k not in ("wall_s",))
        assert parts == pytest.approx(snap["wall_s"], abs=0.005)
    finally:
        ledger.close()
