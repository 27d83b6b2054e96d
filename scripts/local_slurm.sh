#!/usr/bin/env bash
# A real single-node Slurm cluster on localhost, for the tests that submit jobs (and for trying
# `anymodal submit` on a workstation). Needs root and Debian's slurm-wlm + munge:
#
#   bash scripts/local_slurm.sh install   # apt-get install slurm-wlm munge
#   bash scripts/local_slurm.sh start     # munged, slurmctld, slurmd; waits until the node is idle
#   bash scripts/local_slurm.sh stop
#
# State, spool and logs live under $ANYMODAL_SLURM_DIR (default /tmp/anymodal-slurm). The node
# offers this machine's CPUs and 80% of its memory (asking for more than `slurmd -C` reports
# drains the node); one partition, `debug`, without a time limit.
set -euo pipefail
DIR=${ANYMODAL_SLURM_DIR:-/tmp/anymodal-slurm}
CONF=/etc/slurm/slurm.conf

install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    }
}

write_conf() {
    local cpus mem
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 8 / 10))
    mkdir -p /etc/slurm "$DIR"/{state,spool,log}
    cat >"$CONF" <<EOF
# written by anymodal's scripts/local_slurm.sh
ClusterName=anymodal-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MailProg=/bin/true
KillWait=30
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    command -v slurmctld >/dev/null || { echo "slurmctld not found: run '$0 install' first" >&2; exit 1; }
    if sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "Slurm already up"; return; fi
    write_conf
    mkdir -p /run/munge && chown munge:munge /run/munge
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    munge -n | unmunge >/dev/null
    /usr/sbin/slurmctld
    /usr/sbin/slurmd -N localhost
    for _ in $(seq 1 60); do
        if sinfo -h -o %T 2>/dev/null | grep -q idle; then echo "Slurm up: $(sinfo -h -o '%P %D %T %c CPUs')"; return; fi
        sleep 0.5
    done
    echo "Slurm did not come up; logs in $DIR/log" >&2
    exit 1
}

stop() {
    for pidfile in "$DIR"/slurmd.pid "$DIR"/slurmctld.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    echo "Slurm stopped"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
