#!/usr/bin/env bash
# Run the trainer on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--setup] [--package=SPEC]
#                     [--python=python3] [--dry-run] -- [train flags...]
#
#   --setup      first install the package on all workers:
#                  <python> -m pip install -U '<SPEC>'   (SPEC default: jax-bcd-distributed[tpu];
#                  a path or git URL with the [tpu] extra works too)
#   --dry-run    print the exact gcloud commands (one per line, shell-quoted) instead of running
#
# Each step is one `gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...`,
# so every host runs `python3 -m distributed.train <flags>` at the same time;
# distributed.runtime.initialize() then detects the TPU pod (as jax.distributed.initialize()
# does) and wires the hosts together. On a pod, --workdir must be storage all workers share
# (e.g. gs://bucket/run) for checkpoints to resume. Train flags are quoted with printf %q for
# the remote shell. Exit code: gcloud's; 2 for a usage error.
set -euo pipefail

usage() {
  echo "usage: $0 --tpu=NAME --zone=ZONE [--project=P] [--setup] [--package=SPEC]" \
       "[--python=python3] [--dry-run] -- [train flags...]" >&2
  [ -n "${1:-}" ] && echo "error: $1" >&2
  exit 2
}

tpu="" zone="" project="" setup=0 dry=0 package="jax-bcd-distributed[tpu]" python=python3
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; break ;;
    --tpu=*) tpu=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --package=*) package=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --tpu|--zone|--project|--package|--python)
      [ $# -ge 2 ] || usage "$1 needs a value"
      declare "${1#--}=$2"; shift ;;
    --setup) setup=1 ;;
    --dry-run|--dry_run) dry=1 ;;
    -h|--help) usage ;;
    *) usage "unknown option '$1' (train flags go after --)" ;;
  esac
  shift
done
[ -n "$tpu" ] || usage "missing --tpu=NAME"
[ -n "$zone" ] || usage "missing --zone=ZONE"

quote_all() {  # the arguments, each shell-quoted, space-separated
  local out="" a
  for a in "$@"; do out+="${out:+ }$(printf '%q' "$a")"; done
  printf '%s' "$out"
}

on_all_workers() {  # on_all_workers REMOTE_COMMAND
  local cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone")
  [ -n "$project" ] && cmd+=("--project=$project")
  cmd+=(--worker=all "--command=$1")
  if [ "$dry" = 1 ]; then  # all but the last word %q-quoted; the remote command in '...'
    local v=$1 sq="'\\''"
    printf '%s --command=%s\n' "$(quote_all "${cmd[@]:0:${#cmd[@]}-1}")" "'${v//\'/$sq}'"
  else
    "${cmd[@]}"
  fi
}

if [ "$setup" = 1 ]; then
  on_all_workers "$(quote_all "$python" -m pip install -U "$package")"
fi
on_all_workers "$(quote_all "$python" -m distributed.train "$@")"
