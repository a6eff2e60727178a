# Shared by the methods-*.sh profilers: runs `twinhub-bench run --scenarios methods` at one
# concurrency in the background and waits for its phases. Sourced, not run.
set -euo pipefail
OUT="${OUT:-/tmp/twinhub-profile}"
mkdir -p "$OUT"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# start_bench TAG HUB_BIN BENCH_BIN CONCURRENCY WINDOW_SECS [extra bench flags]
start_bench() {
    local tag=$1 hub=$2 bench=$3 conc=$4 win=$5; shift 5
    base="$OUT/$tag"
    "$bench" run --mode quick --scenarios methods --concurrency "$conc" --duration "$win" \
        --warmup 1 --hub-bin "$hub" --no-floor --json "$base.json" "$@" > "$base.txt" 2>&1 &
    bench_pid=$!
}

# waitfor TEXT: until the bench's output shows TEXT (a phase starting).
waitfor() {
    while ! grep -q "$1" "$base.txt" 2>/dev/null; do
        sleep 0.2
        kill -0 "$bench_pid" 2>/dev/null || { echo "the bench ended before: $1" >&2; return 1; }
    done
}

hub_pid() { grep -o 'twinhub pid [0-9]*' "$base.txt" | awk '{print $3}'; }
bench_process() { grep -o 'twinhub-bench-[0-9]*' "$base.txt" | head -1 | cut -d- -f3; }
