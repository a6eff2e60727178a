#!/usr/bin/env bash
# Runs twinhub-bench: installs Mosquitto (Debian) when it is missing, builds the hub and the
# bench in release mode, raises the open-file limit as far as the hard limit allows, and runs
# the scenarios. The bench itself starts the hub, Mosquitto (TLS, cert from the hub's dev CA)
# and the TLS echo floor, and stops them at the end.
#
#   bench/run.sh               quick mode (about a minute of measuring)
#   bench/run.sh full          full mode
#   bench/run.sh quick --scenarios methods --concurrency 1,16   (extra flags go to the bench)
#   bench/run.sh full --scenarios telemetry                      (one scenario)
#   bench/run.sh quick --scenarios routing                       (routing cost, webhooks)
#
# The JSON goes to bench/results/latest-MODE.json, or latest-MODE-SCENARIOS.json when
# --scenarios picks some, so a partial run does not overwrite the last complete one.
# CARGO_TARGET_DIR is honoured.
set -euo pipefail

mode="${1:-quick}"
case "$mode" in
  quick|full) shift || true ;;
  -*) mode=quick ;;
  *) echo "usage: $0 [quick|full] [twinhub-bench run flags...]" >&2; exit 2 ;;
esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "installing mosquitto (Debian package)" >&2
  if [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  fi
fi
# Debian's package may start a system broker on 1883; the bench runs its own on a free port
# and does not need it, so leave it alone.

cargo build --release -p twinhub -p twinhub-bench
target_dir="${CARGO_TARGET_DIR:-target}"

# The telemetry scenario counts the hub's fdatasyncs with `perf stat` on the syscall
# tracepoints; they need tracefs. Mount it when perf is there and we are root (harmless
# otherwise: the figures are then left out with a note).
if command -v perf >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] \
   && [ ! -e /sys/kernel/tracing/events ] && [ -d /sys/kernel/tracing ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi

# The bench raises its own soft limit to the hard limit (the rlimit crate); the hub and
# Mosquitto inherit it. The hard limit caps the connect scenario.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

json="bench/results/latest-$mode.json"
prev=""
for arg in "$@"; do
  case "$arg" in
    --scenarios=*) json="bench/results/latest-$mode-${arg#--scenarios=}.json" ;;
  esac
  if [ "$prev" = "--scenarios" ]; then json="bench/results/latest-$mode-$arg.json"; fi
  prev="$arg"
done
json="${json//,/-}"

mkdir -p bench/results
exec "$target_dir/release/twinhub-bench" run --mode "$mode" --json "$json" "$@"
