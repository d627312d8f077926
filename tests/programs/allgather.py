"""Multi-process smoke program: join via runtime.initialize(), all-gather the process indices.

Prints one line per process:
  ALLGATHER process=<i> count=<n> local=<l> global=<g> gathered=<i0,i1,...> via=<source>
and, with --workdir=DIR, writes DIR/allgather-p<i>.json. Extra flags are ignored, so launchers
that pass the CLI's flags (e.g. launch/slurm.sbatch's --workdir) can run it.
Options: --hang=I (process I sleeps forever after the all-gather), --exit_code=N (process 1 exits N
before initialising), --host_devices=N, --preempt_first_run (on a job's first run, i.e.
SLURM_RESTART_COUNT unset or 0: wait for SIGUSR1/SIGTERM after the all-gather, then exit 42 like
the trainer after a preemption save).
"""

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distributed import runtime  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default=None)
    p.add_argument("--host_devices", type=int, default=None)
    p.add_argument("--exit_code", type=int, default=0)
    p.add_argument("--hang", type=int, default=None)
    p.add_argument("--preempt_first_run", action="store_true")
    args, _ = p.parse_known_args()

    got_signal = threading.Event()
    if args.preempt_first_run:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda s, _f: got_signal.set())
    runtime.configure_host_devices(args.host_devices)
    if args.exit_code and os.environ.get(runtime.ENV_PROCESS_ID) == "1":
        print("process 1 failing on purpose", flush=True)
        return args.exit_code
    info = runtime.initialize(timeout_s=60)
    print(info.log_line(), flush=True)
    print(f"PID process={info.process_index} pid={os.getpid()}", flush=True)

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    gathered = (
        np.asarray(multihost_utils.process_allgather(np.array([jax.process_index()], np.int32)))
        .reshape(-1)
        .tolist()
    )
    print(
        f"ALLGATHER process={info.process_index} count={info.process_count}"
        f" local={info.local_device_count} global={info.global_device_count}"
        f" gathered={','.join(map(str, gathered))} via={info.source}",
        flush=True,
    )
    runtime.check_devices(jax.sharding.Mesh(np.array(jax.devices()), ("data",)))
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        out = Path(args.workdir) / f"allgather-p{info.process_index}.json"
        out.write_text(json.dumps({**dataclasses.asdict(info), "gathered": gathered}))
    if args.hang == info.process_index:
        print(f"HANGING process={info.process_index}", flush=True)
        while True:
            time.sleep(1)
    if args.preempt_first_run and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
        print(f"WAITING process={info.process_index}", flush=True)
        got_signal.wait(120)
        print(f"PREEMPTED process={info.process_index} signal={got_signal.is_set()}", flush=True)
        runtime.shutdown()
        return 42
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
