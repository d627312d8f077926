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
    "vs_peers": {"peers", "measured", "meets_target"},
    "ensemble": {"members", "samples_per_s", "ratio", "target", "meets_target"},
    "dispatch": {"cases", "flops_per_example", "same_parameters"},
}
SUITE = ["transformer", "step_overhead", "vs_seed_loop", "checkpoint", "vs_peers", "data"]


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


def test_ensemble_benchmark_trains_the_same_members_as_the_single_runs():
    record = run_quick("ensemble")
    assert record["members"] == 8 and record["ensemble_mesh"].startswith("ensemble:8")
    assert record["members_vs_singles_max_rel_diff"] < 1e-5


def test_checkpoint_reports_first_save_and_remedies():
    record = run_quick("checkpoint")
    for size in record["sizes"]:
        assert {"first_save_blocking_s", "first_no_slower", "blocking_over_sync"} <= set(size)
    ladder = record["remedies"][0]
    assert {f"{n}_blocking_s" for n in ("before", "+one_replica", "+deferred_checksums",
                                         "+worker")} <= set(ladder)


def test_vs_peers_skips_missing_peers_with_a_reason():
    record = run_quick("vs_peers")
    for peer in ("desisky", "opifex"):
        result = record["peers"][peer]
        if isinstance(result, dict):  # not installed here: skipped, with the reason
            assert result["skipped"].startswith(f"{peer} not installed")
        else:
            for case in result:
                assert {"ratio", "best_test_loss_ours", "best_test_loss_peer",
                        "equal_test_loss"} <= set(case)


def test_gpu_suite_quick_writes_one_json_file(tmp_path):
    out = tmp_path / "suite.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--quick",
                           f"--out={out}"], capture_output=True, text=True, timeout=1500,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite = json.loads(out.read_text())
    assert suite["suite"] == "gpu_suite" and suite["quick"] is True
    assert suite["failed"] == []
    assert [r["benchmark"] for r in suite["results"]] == SUITE
    for record in suite["results"]:
        assert COMMON | EXPECTED[record["benchmark"]] <= set(record)
        assert record["config"]["quick"] is True
