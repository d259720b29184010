#!/usr/bin/env bash
# A one-node Slurm with real accounting on localhost, to run `adbench sweep --executor slurm` against (make test-slurm).
#
#   scripts/slurm_local.sh start   # as root: installs Debian's packages if missing, starts munge, MariaDB, slurmdbd,
#                                  # slurmctld and slurmd, waits until the node is idle; then: export SLURM_CONF=...
#   scripts/slurm_local.sh stop    # cancels the jobs, stops every daemon it started (by PID) and waits for them
#
# Everything lives in $SLURM_LOCAL_DIR (default /tmp/adbench-slurm): configs, state, pid files, logs/*.log. No
# systemd needed. `start` on a running cluster does nothing; after a half-dead run it stops the rest and starts fresh.
set -eEuo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/adbench-slurm}
export SLURM_CONF=$DIR/slurm.conf
PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)  # stop order; the pid file of each is $DIR/run/<name>.pid
DB_PORT=16806 DBD_PORT=16819 CTLD_PORT=16817 SLURMD_PORT=16818  # off the default ports: no clash with a real Slurm

say() { echo "slurm_local: $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 0.2 s
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then say "timed out waiting for $what (logs: $DIR/log)"; return 1; fi
        sleep 0.2
    done
}

pid_of() {  # the PID in run/$1.pid if that process is alive, is that daemon and is not a zombie
    local pid
    pid=$(cat "$DIR/run/$1.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
    [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] && echo "$pid"
}

gone() { ! pid_of "$1" >/dev/null; }

running() {  # every daemon alive, and slurmctld answering
    local name
    for name in "${DAEMONS[@]}"; do pid_of "$name" >/dev/null || return 1; done
    sinfo -h >/dev/null 2>&1
}

install_packages() {
    local missing=()
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if ((EUID != 0)) || ! command -v apt-get >/dev/null; then
        say "needs root and apt-get to install ${missing[*]} (or install them yourself)"; return 1
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    local policy=/usr/sbin/policy-rc.d  # exit 101: the packages must not start their own daemons
    [[ -e $policy ]] || { printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && trap "rm -f $policy" EXIT; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "installed in ${SECONDS}s"
}

write_configs() {
    local mem_mib
    mem_mib=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # slurmd drains a node that has less
    cat >"$SLURM_CONF" <<EOF
ClusterName=adbench
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
MailProg=/bin/true
KillWait=2
ReturnToService=2
NodeName=localhost CPUs=$(nproc) RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"  # slurmdbd refuses a config others can read (it holds the DB password)
}

start_munge() {  # munged with its own key, pid and log under $DIR/munge, on the default socket (Slurm's clients use it)
    install -d -o munge -g munge -m 755 "$DIR/munge" /run/munge
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chown munge:munge "$DIR/munge/munge.key" && chmod 400 "$DIR/munge/munge.key"
    setpriv --reuid=munge --regid=munge --init-groups munged --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for 10 munged munge -n
    ln -sf "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
}

start_mariadb() {  # a private MariaDB on 127.0.0.1:$DB_PORT with a data dir under $DIR, for slurmdbd only
    mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --skip-test-db >"$DIR/log/mariadb-install.log"
    setsid mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mysql.sock" \
        --port=$DB_PORT --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$DIR/run/mariadbd.pid" \
        --log-error="$DIR/log/mariadb.log" --innodb-buffer-pool-size=32M </dev/null >/dev/null 2>&1 &
    wait_for 30 MariaDB mariadb-admin --no-defaults --socket="$DIR/run/mysql.sock" ping
    mariadb --no-defaults --socket="$DIR/run/mysql.sock" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

node_idle() { [[ $(sinfo -h -n localhost -o %t) == idle ]]; }
no_jobs() { [[ -z $(squeue -h -o %F) ]]; }

start() {
    install_packages
    if running; then
        say "already running; export SLURM_CONF=$SLURM_CONF"; return 0  # its jobs go on
    fi
    stop  # whatever a half-dead earlier run left
    if [[ -e $DIR && ! -e $DIR/.slurm_local ]]; then say "$DIR exists and was not made by this script"; return 1; fi
    rm -rf "$DIR"
    install -d -m 755 "$DIR" "$DIR/run" "$DIR/log" "$DIR/state" "$DIR/spool"
    touch "$DIR/.slurm_local"
    trap 'say "start failed; stopping what was started"; stop' ERR
    write_configs
    start_munge
    start_mariadb
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster adbench >/dev/null
    slurmctld
    slurmd -N localhost
    wait_for 60 "the node to be idle" node_idle
    trap - ERR
    say "up after ${SECONDS}s: $(sinfo -h -o '%P %D %c CPUs %m MiB %t'); export SLURM_CONF=$SLURM_CONF"
}

stop() {
    if ! gone slurmctld; then  # cancel the jobs first, so that no job step outlives slurmd
        no_jobs 2>/dev/null || scancel --quiet $(squeue -h -o %F | sort -u) || true
        wait_for 20 "the jobs to end" no_jobs || true
    fi
    local name pid
    for name in "${DAEMONS[@]}"; do
        pid=$(pid_of "$name") || continue
        kill -TERM "$pid"
        wait_for 30 "$name to stop" gone "$name" || { kill -KILL "$pid" 2>/dev/null; wait_for 5 "$name" gone "$name"; }
        say "stopped $name ($pid)"
    done
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
