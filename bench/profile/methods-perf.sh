#!/usr/bin/env bash
# perf record --call-graph dwarf of the hub (HTTP/2 and HTTP/1.1 phases) and Mosquitto for
# SECS seconds inside `methods` windows at one concurrency, then each server's CPU per call by
# layer (classify.py). The perf.data files (about 100 MB each) are deleted afterwards unless
# KEEP=1.
#
#   bench/profile/methods-perf.sh TAG HUB_BIN BENCH_BIN CONCURRENCY SECS [bench flags]
source "$(dirname "$0")/common.sh"
tag=$1 hub=$2 bench=$3 conc=$4 secs=$5; shift 5
start_bench "$tag" "$hub" "$bench" "$conc" $((secs + 6)) "$@"
record() { perf record -F 1999 -e cpu-clock --call-graph dwarf,16384 -p "$1" -o "$2" -- sleep "$secs" > /dev/null 2>&1; }
waitfor "twinhub pid"; pid=$(hub_pid)
waitfor "twinhub methods C=$conc"; sleep 3; record "$pid" "$base.hub-h2.data"
waitfor "twinhub-http1 methods C=$conc"; sleep 3; record "$pid" "$base.hub-h1.data"
waitfor "mosquitto req/resp C=$conc"; sleep 3; record "$(pgrep -n mosquitto)" "$base.mosq.data"
wait "$bench_pid"
for who in hub-h2 hub-h1 mosq; do
    key=$(case $who in hub-h2) echo twinhub;; hub-h1) echo twinhub_http1;; mosq) echo mosquitto;; esac)
    calls=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['methods'][0]; print(m[sys.argv[2]]['per_second']*$secs)" "$base.json" "$key")
    perf script -i "$base.$who.data" -F comm,tid,ip,sym,dso --no-inline 2>/dev/null > "$base.$who.script"
    python3 "$here/classify.py" "$base.$who.script" "$calls"
    [ "${KEEP:-0}" = 1 ] || rm -f "$base.$who.data" "$base.$who.script"
done
