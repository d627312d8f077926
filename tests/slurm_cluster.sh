#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests and CI (Debian/Ubuntu, run as root).
#
#   tests/slurm_cluster.sh up      # install (apt) if missing, start munge + slurmctld + slurmd,
#                                  # wait until the node is idle; prints SLURM_CONF=<path>
#   tests/slurm_cluster.sh down    # stop the daemons this script started (by pid file)
#   tests/slurm_cluster.sh status  # exit 0 if up; prints SLURM_CONF=<path>
#   tests/slurm_cluster.sh env     # prints SLURM_CONF=<path>
#
# Both `up` and `down` are idempotent and serialised with flock. State lives in
# $DISTRIBUTED_SLURM_DIR (default /tmp/distributed-slurm). Every sinfo/sbatch/srun needs
# `export SLURM_CONF=$DISTRIBUTED_SLURM_DIR/etc/slurm.conf` (jobs inherit it).
# Facts behind the choices (shared/notes/slurm-on-one-machine.md): proctrack/linuxproc and
# task/none (with proctrack/cgroup every job fails at launch while sbatch still returns 0),
# NodeName=localhost independent of the hostname, munged runs as user munge, no systemd.
set -euo pipefail

D=${DISTRIBUTED_SLURM_DIR:-/tmp/distributed-slurm}
CONF=$D/etc/slurm.conf
export SLURM_CONF=$CONF
MUNGE_PID=/run/munge/munged.pid

log() { echo "[slurm_cluster] $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { timeout 10 sinfo -h -N -o %T 2>/dev/null | head -n1 || true; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || { log "not root: cannot install SLURM"; exit 3; }
  command -v apt-get >/dev/null || { log "apt-get not available: cannot install SLURM"; exit 3; }
  log "installing munge + slurm (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client >&2 \
    || { apt-get update -q >&2 && \
         apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client >&2; }
}

start_munge() {
  if alive "$MUNGE_PID" && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  rm -f "$MUNGE_PID"
  # daemons must not inherit our stdio (a caller reading our output would wait for them) nor the lock fd 9
  runuser -u munge -- /usr/sbin/munged </dev/null >>"$D/log/munged.out" 2>&1 9>&-
  touch "$D/run/munged.ours"   # `down` stops munged only if we started it
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge 2>/dev/null | grep -q 'STATUS: *Success' && return
    sleep 0.1
  done
  log "munge does not work"; exit 1
}

write_conf() {
  mkdir -p "$D"/{etc,state,spool,run,log,jobs}
  cat > "$CONF.new" <<EOF
ClusterName=distributed-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start only after the old credential expired (default 120 s): keep it short.
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=10
NodeName=localhost CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
}

up() {
  install
  mkdir -p "$D/run" "$D/log"
  if alive "$D/run/slurmctld.pid" && alive "$D/run/slurmd.pid"; then
    case "$(node_state)" in
      idle|mixed|allocated|completing) log "already up"; echo "SLURM_CONF=$CONF"; return ;;
    esac
  fi
  start_munge
  alive "$D/run/slurmctld.pid" || write_conf
  if ! alive "$D/run/slurmctld.pid"; then
    # -c: clean start, no stale jobs from an earlier run
    slurmctld -c -f "$CONF" </dev/null >>"$D/log/slurmctld.out" 2>&1 9>&-
  fi
  if ! alive "$D/run/slurmd.pid"; then
    slurmd -N localhost -f "$CONF" </dev/null >>"$D/log/slurmd.out" 2>&1 9>&-
  fi
  local state=""
  for _ in $(seq 120); do
    state=$(node_state)
    case "$state" in idle|mixed|allocated) break ;; esac
    sleep 0.5
  done
  case "$state" in
    idle|mixed|allocated) ;;
    *) log "node not ready (state '${state:-?}'); see $D/log/"; tail -n 20 "$D"/log/*.log >&2; exit 1 ;;
  esac
  log "up: node localhost $state, $(nproc) CPUs"
  echo "SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid PIDFILE NAME
  local f=$1 pid
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.1; done
  log "$2 ($pid) did not stop; SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  stop_pid "$D/run/slurmd.pid" slurmd
  stop_pid "$D/run/slurmctld.pid" slurmctld
  if [ -e "$D/run/munged.ours" ]; then
    stop_pid "$MUNGE_PID" munged
    rm -f "$D/run/munged.ours"
  fi
  log "down"
}

status() {
  alive "$D/run/slurmctld.pid" && alive "$D/run/slurmd.pid" || { log "down"; return 1; }
  local s; s=$(node_state)
  log "node localhost: ${s:-unknown}"
  echo "SLURM_CONF=$CONF"
  case "$s" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

cmd=${1:-}
case "$cmd" in
  up|down|status)
    mkdir -p "$D"
    exec 9>"$D/.lock"
    flock 9
    "$cmd" ;;
  env) echo "SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
