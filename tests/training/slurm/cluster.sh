#!/usr/bin/env bash
# A throw-away two-node Slurm cluster on localhost for tests: munged + slurmctld + two slurmd ("n1", "n2",
# NodeAddr=127.0.0.1, distinct ports), all state, sockets and logs under DIR. Needs root and Debian's
# slurm-wlm + munge (no systemd, no cgroups).
#
#   tests/training/slurm/cluster.sh start DIR      # prints the SLURM_CONF path when the nodes are idle
#   tests/training/slurm/cluster.sh stop DIR       # cancels the jobs, kills the daemons by PID and every process left
#                                         # with this cluster's SLURM_CONF, whatever state they are in
set -euo pipefail
cmd=$1 S=$(realpath -m "$2")
PORT_BASE=${SLURM_TEST_PORT_BASE:-17817}
# munged wants every directory above its socket world-executable (pytest's temp dirs are 0700): keep the socket
# and munged's pid file in their own /tmp folder, named after DIR so `stop` finds it again.
R=/tmp/m2pt-munge-$(printf %s "$S" | sha1sum | cut -c1-12)
CPUS=${SLURM_TEST_CPUS_PER_NODE:-1}

stop() {
  # The jobs first: slurmstepd and srun ignore SIGTERM and outlive the daemons that started them.
  if [ -f "$S"/slurm.conf ] && [ -f "$S"/slurmctld.pid ]; then
    SLURM_CONF="$S"/slurm.conf scancel --full -u root 2>/dev/null || true
    for _ in $(seq 1 100); do
      [ -z "$(SLURM_CONF="$S"/slurm.conf squeue -h 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  for f in "$S"/slurmd-n1.pid "$S"/slurmd-n2.pid "$S"/slurmctld.pid "$R"/munged.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.5
  for f in "$S"/slurmd-n1.pid "$S"/slurmd-n2.pid "$S"/slurmctld.pid "$R"/munged.pid; do
    [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
  done
  # Whatever is left of this cluster's jobs (slurmstepd, the batch shell, srun, the ranks): each was started with
  # this cluster's SLURM_CONF in its environment.
  for e in /proc/[0-9]*/environ; do
    tr '\0' '\n' 2>/dev/null < "$e" | grep -qx "SLURM_CONF=$S/slurm.conf" || continue
    p=${e#/proc/}; p=${p%/environ}
    [ "$p" != $$ ] && kill -9 "$p" 2>/dev/null || true
  done
  rm -rf "$R"
  return 0
}

if [ "$cmd" = stop ]; then stop; exit 0; fi

mkdir -p "$S"/munge "$S"/state "$S"/spool "$S"/log "$R"
chmod 700 "$S"/munge; chmod 755 "$R"
[ -f "$S"/munge/munge.key ] || mungekey -c -k "$S"/munge/munge.key
chmod 600 "$S"/munge/munge.key
munged --socket="$R"/munge.sock --key-file="$S"/munge/munge.key --pid-file="$R"/munged.pid \
       --log-file="$S"/log/munged.log --seed-file="$S"/munge/munged.seed
cat > "$S"/slurm.conf <<CONF
ClusterName=m2pttest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$R/munge.sock,cred_expire=10
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
SlurmctldPort=$PORT_BASE
SlurmdPort=$((PORT_BASE + 1))
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerParameters=sched_interval=1
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + 4)) CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT_BASE + 5)) CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$S"/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N n1
slurmd -f "$SLURM_CONF" -N n2
for _ in $(seq 1 100); do
  [ "$(sinfo -h -o %T 2>/dev/null | sort -u)" = idle ] && { echo "$SLURM_CONF"; exit 0; }
  sleep 0.1
done
echo "cluster did not become idle; logs in $S/log" >&2
sinfo -N >&2 || true
stop
exit 1
