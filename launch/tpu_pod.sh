#!/usr/bin/env bash
# Run the trainer on every worker of a Cloud TPU VM pod slice.
set -euo pipefail

HELP="usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--setup [--package=SPEC]]
                          [--python=python3] [--dry-run] -- [train flags...]

Runs 'python3 -m distributed.train <train flags>' on every worker of the TPU VM slice NAME at
once (gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...);
distributed.runtime.initialize() then detects the pod and joins the hosts into one job.

  --tpu=NAME, --zone=ZONE, --project=P   the TPU VM (gcloud's names; --project optional)
  --setup         first install this project on every worker, then train. By default it
                  builds a wheel of the checkout this script belongs to, on this machine
                  (python3 -m pip wheel --no-deps; \$LOCAL_PYTHON overrides python3), copies it
                  to every worker (gcloud compute tpus tpu-vm scp --worker=all) and runs
                  '<python> -m pip install -U ./<wheel>[tpu]' there (then reinstalls the wheel
                  itself with --force-reinstall --no-deps, so a same-version rebuild lands).
  --package=SPEC  with --setup: install SPEC instead of the checkout. SPEC is a wheel file on
                  this machine (copied to the workers first; FILE.whl[tpu] adds the extra), or
                  anything pip on the workers accepts, e.g. a wheel URL or
                  'jax-bcd-distributed[tpu] @ git+https://github.com/OWNER/REPO.git@REF'.
                  (The project is not on PyPI: a bare 'jax-bcd-distributed' does not install.)
  --python=PY     the workers' Python, 3.11 or newer (default python3)
  --dry-run       print the commands (one per line, shell-quoted) instead of running them
  -h, --help      this help

On a pod, --workdir must be a file system mounted on every worker (NFS/Filestore, gcsfuse) for
checkpoints to resume. Exit code: the failing command's; 2 for a usage error."

usage() {  # usage MESSAGE: one error line, exit 2
  echo "error: $1; run $0 --help for the options." >&2
  exit 2
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
tpu="" zone="" project="" setup=0 dry=0 package="" python=python3
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
    -h|--help) echo "$HELP"; exit 0 ;;
    *) usage "unknown option '$1' (train flags go after --)" ;;
  esac
  shift
done
[ -n "$tpu" ] || usage "missing --tpu=NAME"
[ -n "$zone" ] || usage "missing --zone=ZONE"
[ -z "$package" ] || [ "$setup" = 1 ] || usage "--package=$package needs --setup"

quote_all() {  # the arguments, each shell-quoted, space-separated
  local out="" a
  for a in "$@"; do out+="${out:+ }$(printf '%q' "$a")"; done
  printf '%s' "$out"
}

gcloud_args=("--zone=$zone")
[ -n "$project" ] && gcloud_args+=("--project=$project")

run() {  # run COMMAND...: print it (dry run) or run it
  if [ "$dry" = 1 ]; then quote_all "$@"; echo; else "$@"; fi
}

on_all_workers() {  # on_all_workers REMOTE_COMMAND
  local cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all)
  if [ "$dry" = 1 ]; then  # the remote command in '...', as a user would type it
    local v=$1 sq="'\\''"
    printf '%s --command=%s\n' "$(quote_all "${cmd[@]}")" "'${v//\'/$sq}'"
  else
    "${cmd[@]}" "--command=$1"
  fi
}

copy_to_workers() {  # copy_to_workers LOCAL_FILE: to the home folder of every worker
  run gcloud compute tpus tpu-vm scp "$1" "$tpu:$(basename "$1")" "${gcloud_args[@]}" --worker=all
}

install_on_workers() {  # install_on_workers SPEC: deps and extras, then the package itself
  on_all_workers "$(quote_all "$python" -m pip install -U "$1") && $(quote_all \
    "$python" -m pip install --no-deps --force-reinstall "$1")"
}

if [ "$setup" = 1 ]; then
  if [ -z "$package" ]; then  # a wheel of this checkout
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml")
    wheel_dir="${TMPDIR:-/tmp}/jax-bcd-wheel.XXXXXX"
    if [ "$dry" = 0 ]; then
      wheel_dir=$(mktemp -d "$wheel_dir")
      trap 'rm -rf "$wheel_dir"' EXIT
    fi
    run "${LOCAL_PYTHON:-python3}" -m pip wheel --no-deps -q -w "$wheel_dir" "$repo"
    wheel="$wheel_dir/jax_bcd_distributed-$version-py3-none-any.whl"
    [ "$dry" = 1 ] || [ -f "$wheel" ] || wheel=$(ls "$wheel_dir"/jax_bcd_distributed-*.whl)
    copy_to_workers "$wheel"
    install_on_workers "./$(basename "$wheel")[tpu]"
  elif [ -f "${package%%\[*}" ]; then  # a wheel file here: copy it first
    copy_to_workers "${package%%\[*}"
    extra=${package#"${package%%\[*}"}
    install_on_workers "./$(basename "${package%%\[*}")$extra"
  else
    install_on_workers "$package"
  fi
fi
on_all_workers "$(quote_all "$python" -m distributed.train "$@")"
