#!/usr/bin/env bash
# Syscall timeline at C=1 (one call in flight, so calls are serial): `perf record -a` of the
# read/write/epoll/futex tracepoints for 1.5 s inside the twinhub HTTP/2, HTTP/1.1 and
# Mosquitto windows, then the median of each leg of a call (legs.py). The trace files (a few
# hundred MB on a busy machine) are deleted afterwards unless KEEP=1.
#
#   bench/profile/methods-trace.sh TAG HUB_BIN BENCH_BIN [bench flags]
source "$(dirname "$0")/common.sh"
tag=$1 hub=$2 bench=$3; shift 3
events=()
for s in recvfrom writev read write sendto epoll_wait futex; do
    events+=(-e "syscalls:sys_enter_$s" -e "syscalls:sys_exit_$s")
done
record() { perf record -a "${events[@]}" -e sched:sched_switch -o "$1" -- sleep 1.5 > /dev/null 2>&1; }
start_bench "$tag" "$hub" "$bench" 1 8 "$@"
waitfor "twinhub pid"; pid=$(hub_pid)
waitfor "twinhub methods C=1"; sleep 3; record "$base.h2.data"
waitfor "twinhub-http1 methods C=1"; sleep 3; record "$base.h1.data"
waitfor "mosquitto req/resp C=1"; mpid=$(pgrep -n mosquitto); sleep 3; record "$base.mosq.data"
wait "$bench_pid"
bpid=$(bench_process)
for who in h2 h1 mosq; do
    server=$pid; [ "$who" = mosq ] && server=$mpid
    echo "== $who"
    perf script -i "$base.$who.data" -F comm,pid,tid,time,event,trace 2>/dev/null \
        | python3 "$here/legs.py" "$server" "$bpid"
    [ "${KEEP:-0}" = 1 ] || rm -f "$base.$who.data"
done
