"""Start N local processes of a command, each with M simulated CPU devices, wired together.

    jax-bcd-launch --processes=2 --devices_per_process=4 -- \
        python -m distributed.train --workdir=runs/two_hosts

(``python launch/local.py ...`` from a checkout is the same program.)

Every child gets, besides the parent's environment:

    JAX_PLATFORMS=cpu
    XLA_FLAGS=<parent's flags> --xla_force_host_platform_device_count=M   (any old count replaced)
    DISTRIBUTED_HOST_DEVICES=M
    DISTRIBUTED_COORDINATOR_ADDRESS=127.0.0.1:<port>   (a free port unless --port is given)
    DISTRIBUTED_NUM_PROCESSES=N
    DISTRIBUTED_PROCESS_ID=i
    PYTHONUNBUFFERED=1

``distributed.runtime.initialize()`` reads the DISTRIBUTED_* variables, so the command needs no
coordinator flags. Output lines are prefixed with ``[p<i>] ``. SIGINT/SIGTERM/SIGUSR1 are forwarded
to all children (each runs in its own process group; a second SIGINT/SIGTERM kills them). When a
child fails (non-zero exit or killed by a signal) the others get SIGTERM, then SIGKILL after
``--grace`` seconds, and this launcher exits with the first failure's code (128+signal for a
signal). ``--timeout`` (seconds, 0 = none) bounds the whole run: exit code 124. Exit 0 only when
every child exits 0. ``--print_pids`` logs ``[local] process <i> pid <pid>`` for each child (to
signal or kill one of them). No training logic here: a launcher sets the environment and starts
the command (jax is imported with the package, never initialised).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
TIMEOUT_EXIT_CODE = 124
# gloo's C++ writes its per-connection line in pieces to stderr, so another writer's text can land
# between them: match the pieces, not the line
GLOO_HEAD = re.compile(rb"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\. ?")
GLOO_TAIL = re.compile(rb"Expected number of connected peer ranks is : \d+")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def child_env(base: dict, *, index: int, processes: int, devices: int, address: str) -> dict:
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join(
        [*flags.split(), f"--xla_force_host_platform_device_count={devices}"]
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["DISTRIBUTED_HOST_DEVICES"] = str(devices)
    env["DISTRIBUTED_COORDINATOR_ADDRESS"] = address
    env["DISTRIBUTED_NUM_PROCESSES"] = str(processes)
    env["DISTRIBUTED_PROCESS_ID"] = str(index)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def die_with_parent(parent: int):
    """A ``preexec_fn`` that makes the child get SIGKILL when this launcher dies, even by
    ``kill -9`` (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere a no-op): no orphaned training
    process keeps running. A child whose launcher died before the call exits at once."""

    def preexec() -> None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            return
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def exit_code_of(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class Launcher:
    def __init__(
        self,
        command: list[str],
        processes: int,
        devices: int,
        port: int,
        grace: float,
        timeout: float,
        print_pids: bool = False,
    ):
        self.command = command
        self.print_pids = print_pids
        self.n = processes
        self.devices = devices
        self.port = port or free_port()
        self.grace = grace
        self.timeout = timeout
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self.out_lock = threading.Lock()
        self.signals_seen = 0
        self.first_failure: int | None = None
        self.kill_deadline: float | None = None

    def log(self, msg: str) -> None:
        with self.out_lock:
            sys.stdout.buffer.write(f"[local] {msg}\n".encode())
            sys.stdout.buffer.flush()

    def _pump(self, index: int, stream) -> None:
        prefix = f"[p{index}] ".encode()
        gloo = 0
        for line in iter(stream.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            out = []
            if GLOO_HEAD.search(line):  # gloo prints one line per connection: fold them
                gloo += 1
                if gloo == 1:
                    out.append(b"[Gloo] connected to its peers (further [Gloo] lines folded)\n")
            rest = GLOO_TAIL.sub(b"", GLOO_HEAD.sub(b"", line))
            if rest == line or rest.strip():  # keep what another writer put on gloo's line
                out.append(rest)
            with self.out_lock:
                for piece in out:
                    sys.stdout.buffer.write(prefix + piece)
                sys.stdout.buffer.flush()
        stream.close()

    def start(self) -> None:
        address = f"127.0.0.1:{self.port}"
        self.log(f"{self.n} process(es) x {self.devices} CPU device(s), coordinator {address}")
        for i in range(self.n):
            env = child_env(
                os.environ, index=i, processes=self.n, devices=self.devices, address=address
            )
            p = subprocess.Popen(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(os.getpid()),
            )
            self.procs.append(p)
            if self.print_pids:
                self.log(f"process {i} pid {p.pid}")
            t = threading.Thread(target=self._pump, args=(i, p.stdout), daemon=True)
            t.start()
            self.readers.append(t)

    def signal_all(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass

    def on_signal(self, sig, _frame) -> None:
        self.signals_seen += 1
        if self.signals_seen > 1 and sig in (signal.SIGINT, signal.SIGTERM):
            self.log(f"second {signal.Signals(sig).name}: killing all processes")
            self.signal_all(signal.SIGKILL)
            return
        self.log(f"forwarding {signal.Signals(sig).name} to all processes")
        self.signal_all(sig)

    def terminate_others(self) -> None:
        if self.kill_deadline is None:
            self.signal_all(signal.SIGTERM)
            self.kill_deadline = time.monotonic() + self.grace

    def run(self) -> int:
        for sig in FORWARDED:
            signal.signal(sig, self.on_signal)
        self.start()
        start = time.monotonic()
        timed_out = False
        while True:
            codes = [p.poll() for p in self.procs]
            for i, rc in enumerate(codes):
                if rc not in (None, 0) and self.first_failure is None:
                    self.first_failure = exit_code_of(rc)
                    self.log(
                        f"process {i} failed with exit code {self.first_failure}; "
                        "stopping the others"
                    )
                    self.terminate_others()
            if all(rc is not None for rc in codes):
                break
            now = time.monotonic()
            if self.timeout and not timed_out and now - start > self.timeout:
                timed_out = True
                self.log(f"timeout after {self.timeout:g} s; stopping all processes")
                self.terminate_others()
            if self.kill_deadline is not None and now > self.kill_deadline:
                self.log(f"grace period of {self.grace:g} s over; killing the rest")
                self.signal_all(signal.SIGKILL)
                self.kill_deadline = float("inf")
            time.sleep(0.05)
        for t in self.readers:  # a grandchild may keep a pipe open: don't wait forever
            t.join(timeout=2.0)
        if timed_out:
            return TIMEOUT_EXIT_CODE
        if self.first_failure is not None:
            return self.first_failure
        return 0


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        k = argv.index("--")
        own, command = argv[:k], argv[k + 1 :]
    else:
        own, command = argv, []
    p = argparse.ArgumentParser(
        prog="launch/local.py",
        description="Run N wired processes of a command, M simulated CPU devices each.",
        usage="%(prog)s --processes=N --devices_per_process=M [--port=0] [--grace=10] "
        "[--timeout=0] [--print_pids] -- COMMAND...",
    )
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=1)
    p.add_argument("--port", type=int, default=0, help="coordinator port (0 = pick a free one)")
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds between SIGTERM and SIGKILL when stopping processes",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="wall-clock limit for the whole run in seconds (0 = none); exit 124",
    )
    p.add_argument(
        "--print_pids",
        action="store_true",
        help="log '[local] process <i> pid <pid>' for every child once started",
    )
    args = p.parse_args(own)
    if not command:
        p.error("missing the command to run after '--'")
    if args.processes < 1 or args.devices_per_process < 1:
        p.error("--processes and --devices_per_process must be >= 1")
    if shutil.which(command[0]) is None:
        if os.path.isfile(command[0]):
            p.error(f"the command {command[0]!r} is not executable: chmod +x it, or run it "
                    f"through its interpreter (e.g. -- {sys.executable} {command[0]})")
        p.error(f"the command {command[0]!r} was not found (not an executable file, nor on "
                f"PATH); give it after '--', e.g. -- {sys.executable} -m distributed.train")
    return args, command


def main(argv: list[str] | None = None) -> int:
    args, command = parse(sys.argv[1:] if argv is None else argv)
    launcher = Launcher(
        command,
        args.processes,
        args.devices_per_process,
        args.port,
        args.grace,
        args.timeout,
        print_pids=args.print_pids,
    )
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
