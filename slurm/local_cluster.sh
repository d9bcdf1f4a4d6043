#!/usr/bin/env bash
# A throwaway single-node Slurm on this machine, to check slurm/submit.sh without a cluster (not part of CI).
#   apt-get install -y slurm-wlm munge             # Debian/Ubuntu packages (Debian 12: Slurm 22.05)
#   bash slurm/local_cluster.sh start              # writes $SLURM_LOCAL/slurm.conf, starts munge and slurm
#   export SLURM_CONF=/tmp/slurm-local/slurm.conf  # as start prints: sbatch, squeue, sinfo use this cluster
#   bash slurm/local_cluster.sh stop               # stops the three daemons it started (by their pid files)
# The node is this host with all its CPUs, one partition, no accounting, no cgroups (proctrack/linuxproc), run
# as root: a test bench, not a production configuration. State and logs stay in $SLURM_LOCAL.
set -euo pipefail
DIR=${SLURM_LOCAL:-/tmp/slurm-local}
HOST=$(hostname -s)

start() {
  mkdir -p "$DIR/state" "$DIR/spool" /run/munge
  cat > "$DIR/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$HOST CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  [ -f /etc/munge/munge.key ] || mungekey --create  # the munge package normally makes one at install
  # --force: running as root with this key is fine on a test bench
  munged --force --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log"
  export SLURM_CONF=$DIR/slurm.conf
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  for _ in $(seq 30); do  # the node registers within a few seconds
    sinfo -h -o %T 2>/dev/null | grep -qx idle && break
    sleep 1
  done
  sinfo
  echo "running; now: export SLURM_CONF=$SLURM_CONF"
}

stop() {
  for d in slurmd slurmctld munged; do
    if [ -f "$DIR/$d.pid" ] && kill "$(cat "$DIR/$d.pid")" 2>/dev/null; then echo "stopped $d"
    else echo "$d not running"; fi
    rm -f "$DIR/$d.pid"
  done
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: bash slurm/local_cluster.sh start|stop" >&2; exit 2 ;;
esac
