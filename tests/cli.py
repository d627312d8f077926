"""Run the command line in a subprocess (fresh jax, its own simulated devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    env.update(extra or {})
    return env


def run_cli(*args, timeout=600, env=None, module="distributed.train"):
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env), cwd=ROOT)


def summary(workdir):
    return json.loads((Path(workdir) / "summary.json").read_text())


def metrics(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def step_losses(workdir):
    return {r["step"]: r["loss"] for r in metrics(workdir) if "loss" in r}


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in err_lines[0], (n, err_lines[0])
    return err_lines[0]


def tensorboard_tags(folder):
    """The scalar tags in the TensorBoard event files of ``folder`` (TFRecord framing: length,
    crc, event, crc), read with tensorboardX's protos."""
    import struct

    from tensorboardX.proto import event_pb2

    tags = set()
    for events in Path(folder).glob("events.out.tfevents*"):
        data, i = events.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("Q", data[i:i + 8])[0]
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            tags.update(v.tag for v in ev.summary.value)
            i += 12 + n + 4
    return tags
