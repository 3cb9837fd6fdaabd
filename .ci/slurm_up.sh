#!/usr/bin/env bash
# Install and start a one-node Slurm on this host so tests/launcher/test_slurm_real.py can submit real jobs.
#
# Run as root on Debian/Ubuntu. Idempotent: a second run reuses the installed packages, rewrites the same
# config and only starts the daemons that are not running. It always exits 0; the outcome is written to a
# status file (default /tmp/automodel_jax_slurm_status, override with AUTOMODEL_JAX_SLURM_STATUS) holding
# either "SLURM_READY" or "SLURM_UNAVAILABLE: <reason>", which the tests read to skip with that reason.
set -u

STATUS_FILE="${AUTOMODEL_JAX_SLURM_STATUS:-/tmp/automodel_jax_slurm_status}"
CONF_DIR=/etc/slurm
NODE="$(hostname -s)"
WAIT_S="${SLURM_UP_WAIT_S:-60}"

unavailable() {
    echo "SLURM_UNAVAILABLE: $*"
    echo "SLURM_UNAVAILABLE: $*" >"$STATUS_FILE"
    exit 0
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || unavailable "must run as root to install slurm-wlm and munge"
    command -v apt-get >/dev/null || unavailable "apt-get not found (Debian/Ubuntu only)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/tmp/slurm_up_apt.log 2>&1 || unavailable "apt-get update failed (see /tmp/slurm_up_apt.log)"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >>/tmp/slurm_up_apt.log 2>&1 \
        || unavailable "apt-get install slurm-wlm munge failed (see /tmp/slurm_up_apt.log)"
}

write_config() {
    # slurmctld and slurmd look the node up by name; containers do not always map their hostname.
    getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
    cat >"$CONF_DIR/slurm.conf" <<EOF
# One-node test cluster written by .ci/slurm_up.sh; no cgroups, no accounting database.
ClusterName=automodel-ci
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$NODE CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    if ! munge -n >/dev/null 2>&1; then
        runuser -u munge -- munged || unavailable "munged failed to start (see /var/log/munge/munged.log)"
    fi
    munge -n | unmunge >/dev/null 2>&1 || unavailable "munge round trip failed (see /var/log/munge/munged.log)"
}

running() {  # running <pid file>
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_slurm() {
    running /run/slurm/slurmctld.pid || slurmctld || unavailable "slurmctld failed (see /var/log/slurm/slurmctld.log)"
    running /run/slurm/slurmd.pid || slurmd || unavailable "slurmd failed (see /var/log/slurm/slurmd.log)"
}

wait_idle() {
    local state=""
    for _ in $(seq "$WAIT_S"); do
        state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)"
        case "$state" in
            idle|mixed|allocated) echo "slurm_up: node $NODE is $state"; return 0 ;;
            drain*|down*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 ;;
        esac
        sleep 1
    done
    unavailable "node $NODE not idle after ${WAIT_S}s (state '${state:-unknown}'; see /var/log/slurm/)"
}

install_packages
write_config
start_munge
start_slurm
wait_idle
echo "SLURM_READY" >"$STATUS_FILE"
echo "SLURM_READY: partition debug on $NODE (status in $STATUS_FILE)"
