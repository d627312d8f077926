#!/usr/bin/env bash
# Every benchmark at GPU sizes, one after the other, each under its own timeout, within
# 8 minutes on one H100/H200; their JSON lines are collected into ONE JSON file:
#
#   {"suite": "gpu_suite", "quick": false, "wall_s": ..., "results": [<record>, ...],
#    "failed": [{"benchmark", "rc", "seconds", "error"}, ...]}
#
# where each record is the benchmark's own JSON line (benchmarks/README.md).
#
#   bash benchmarks/gpu_suite.sh [--out=FILE] [--quick] [--only=name,name] [--logs=DIR]
#
#   --out    the JSON file (default benchmarks/gpu_results.json, git-ignored)
#   --quick  CPU smoke test (CI): every benchmark with --quick --devices=8
#   --only   run only these benchmarks (names as below)
#   --logs   keep each benchmark's stderr there (default: a temporary folder)
#
# A benchmark that fails or runs past its timeout is listed under "failed" and the suite goes
# on; the exit code is 1 if any failed. PYTHON overrides the interpreter (default .venv/bin/python,
# else python3). The timeouts are budgets for one H100/H200 (sum 475 s), not measurements:
# no GPU was available when this was written.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/benchmarks/gpu_results.json"
quick=0
only=""
logs=""
for arg in "$@"; do
  case "$arg" in
    --out=*) out="${arg#--out=}" ;;
    --quick) quick=1 ;;
    --only=*) only="${arg#--only=}" ;;
    --logs=*) logs="${arg#--logs=}" ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "error: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

if [[ -n "${PYTHON:-}" ]]; then py="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"
else py="python3"; fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
logs="${logs:-$work/logs}"
mkdir -p "$logs" "$(dirname "$out")"

# name | timeout on a GPU (s) | GPU-size flags
benchmarks=(
  "transformer|130|--size=1b --steps=10 --reps=2 --warmup=2"
  "step_overhead|60|--reps=10"
  "vs_seed_loop|50|--reps=2"
  "checkpoint|90|--widths=288,912,9130 --saves=3 --remedies=288,912 --remedy_saves=3 --runs=1 --epochs_per_phase=4"
  "vs_peers|100|--epochs=10 --opifex_epochs=100"
  "data|45|--batches=300 --reps=2 --train_runs=1"
)

start=$(date +%s)
status=0
: > "$work/records.jsonl"
: > "$work/failed.jsonl"
for entry in "${benchmarks[@]}"; do
  IFS='|' read -r name limit flags <<< "$entry"
  if [[ -n "$only" && ",$only," != *",$name,"* ]]; then continue; fi
  if (( quick )); then limit=300; flags="--quick --devices=8"; fi
  echo "== $name (timeout ${limit}s): $flags" >&2
  t0=$(date +%s)
  rc=0
  # shellcheck disable=SC2086  # flags are words
  timeout --kill-after=10 "$limit" "$py" "$root/benchmarks/$name.py" $flags \
    > "$work/$name.out" 2> "$logs/$name.err" || rc=$?
  seconds=$(( $(date +%s) - t0 ))
  lines=$(grep -c . "$work/$name.out" || true)
  if (( rc == 0 )) && (( lines == 1 )); then
    cat "$work/$name.out" >> "$work/records.jsonl"
    echo "   ok in ${seconds}s" >&2
  else
    status=1
    if (( rc == 124 || rc == 137 )); then error="timeout after ${limit}s"
    elif (( rc != 0 )); then error="exit code $rc: $(tail -n 1 "$logs/$name.err" | cut -c1-300)"
    else error="expected one JSON line on stdout, got $lines"; fi
    echo "   FAILED: $error (stderr: $logs/$name.err)" >&2
    "$py" -c 'import json, sys; print(json.dumps({"benchmark": sys.argv[1], "rc": int(sys.argv[2]),
        "seconds": int(sys.argv[3]), "error": sys.argv[4]}))' \
      "$name" "$rc" "$seconds" "$error" >> "$work/failed.jsonl"
  fi
done

"$py" - "$work/records.jsonl" "$work/failed.jsonl" "$out" "$quick" "$(( $(date +%s) - start ))" <<'EOF'
import json, sys
records, failed, out, quick, wall = sys.argv[1:6]
load = lambda p: [json.loads(line) for line in open(p) if line.strip()]
suite = {"suite": "gpu_suite", "quick": quick == "1", "wall_s": int(wall),
         "results": load(records), "failed": load(failed)}
with open(out, "w") as f:
    json.dump(suite, f, indent=1)
    f.write("\n")
print(f"wrote {out}: {len(suite['results'])} results, {len(suite['failed'])} failed, "
      f"{wall}s", file=sys.stderr)
EOF
exit "$status"
