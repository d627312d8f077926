"""Smoke test of the benchmarks: each one runs with --quick on 8 simulated CPU devices and
prints exactly one JSON line with its expected keys. No timing is checked here (speed targets
live in benchmarks/, never in timed tests)."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMON = {"benchmark", "config", "machine"}
MACHINE = {"platform", "device_kind", "device_count", "cpu_count", "jax_version", "date"}
EXPECTED = {
    "step_overhead": {"cases", "worst_ratio", "target", "meets_target"},
    "vs_seed_loop": {"seed", "system", "ratio", "target", "meets_target"},
    "data": {"pipeline", "training", "target", "meets_target"},
    "checkpoint": {"sizes", "worst_blocking_over_sync", "throughput", "meets_target"},
    "scaling": {"memory", "compiles", "meets_target"},
    "transformer": {"tokens_per_s", "achieved_tflops", "mfu", "step_s", "params"},
}


@functools.cache  # one run per benchmark, shared by the tests
def run_quick(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--devices=8"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {len(lines)}:\n{proc.stdout}"
    return json.loads(lines[0])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_benchmark_prints_one_json_line(name):
    record = run_quick(name)
    assert COMMON | EXPECTED[name] <= set(record), sorted(record)
    assert record["benchmark"] == name
    assert MACHINE <= set(record["machine"])
    assert record["machine"]["device_count"] == 8
    assert record["config"]["quick"] is True


def test_step_overhead_compares_the_same_training():
    record = run_quick("step_overhead")
    for case in record["cases"]:
        # Same initial state, batch and optimizer: the same loss and the same parameters.
        assert case["first_loss"]["system"] == pytest.approx(case["first_loss"]["baseline"])
        assert case["params_max_abs_diff"] < 1e-5
        assert set(case["system_trace_counts"].values()) == {1}
