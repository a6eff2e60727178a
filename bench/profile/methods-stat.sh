#!/usr/bin/env bash
# perf stat of the hub (HTTP/2 and HTTP/1.1 phases) and Mosquitto inside 12 s `methods`
# windows at one concurrency: CPU, context switches and syscalls per call. Counts do not
# depend on how busy the machine is, so they compare builds on a shared machine.
#
#   bench/profile/methods-stat.sh TAG HUB_BIN BENCH_BIN CONCURRENCY [bench flags]
#
# Output in $OUT (default /tmp/twinhub-profile): TAG.json, TAG.{hub-h2,hub-h1,mosq}.stat
# and the per-call summary on stdout.
source "$(dirname "$0")/common.sh"
tag=$1 hub=$2 bench=$3 conc=$4; shift 4
events='task-clock,context-switches,cpu-migrations'
for s in futex epoll_wait recvfrom sendto writev write read; do events="$events,syscalls:sys_enter_$s"; done
start_bench "$tag" "$hub" "$bench" "$conc" 12 "$@"
waitfor "twinhub pid"; pid=$(hub_pid)
waitfor "twinhub methods C=$conc"; sleep 3
perf stat -e "$events" -p "$pid" -o "$base.hub-h2.stat" -- sleep 6
waitfor "twinhub-http1 methods C=$conc"; sleep 3
perf stat -e "$events" -p "$pid" -o "$base.hub-h1.stat" -- sleep 6
waitfor "mosquitto req/resp C=$conc"; sleep 3
perf stat -e "$events" -p "$(pgrep -n mosquitto)" -o "$base.mosq.stat" -- sleep 6
wait "$bench_pid"
python3 "$here/stat_summary.py" "$base"
