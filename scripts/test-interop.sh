#!/usr/bin/env bash
# Runs the interop tests: the official Azure IoT Python SDKs against a real twinhub.
#
#   scripts/test-interop.sh [pytest args...]
#
# Builds the hub (`cargo build -p twinhub`) unless TWINHUB_BIN names a binary, prepares the
# venv (scripts/python-env.sh), the Node.js packages (scripts/node-env.sh, exported as
# TWINHUB_NODE_MODULES) and Debian's chromium for the web console's browser tests
# (scripts/chromium-env.sh, exported as TWINHUB_CHROMIUM), runs `pytest tests/interop -q`
# and exits non-zero when any test fails or errors, when nothing ran, or when anything was
# skipped or xfailed without being listed in ALLOWED_SKIPS below with a reason.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# Test node ids that may be skipped, each with the reason. Keep it empty: a skip hides a gap.
declare -A ALLOWED_SKIPS=(
)

if [[ -z "${TWINHUB_BIN:-}" ]]; then
    echo "test-interop: cargo build -p twinhub" >&2
    cargo build -p twinhub
    # The Rust example programs, for test_cross_language.py (found next to the hub binary).
    cargo build -p twinhub --examples
    TWINHUB_BIN="${CARGO_TARGET_DIR:-$repo/target}/debug/twinhub"
fi
[[ -x "$TWINHUB_BIN" ]] || { echo "test-interop: ERROR: no executable hub at $TWINHUB_BIN" >&2; exit 1; }
export TWINHUB_BIN

venv="$("$repo/scripts/python-env.sh")"
python="$venv/bin/python"

# The official Node.js SDKs (Event Hubs, azure-iothub, the device HTTP transport) and rhea,
# for the *_node.py tests.
TWINHUB_NODE_MODULES="$("$repo/scripts/node-env.sh")"
export TWINHUB_NODE_MODULES

# Debian's chromium, driven headless by playwright-core in test_console.py (installed with
# apt-get when missing and running as root; fails otherwise, so the browser tests never skip).
TWINHUB_CHROMIUM="$("$repo/scripts/chromium-env.sh")"
export TWINHUB_CHROMIUM

workdir="$(mktemp -d "${TMPDIR:-/tmp}/twinhub-interop.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT
junit="$workdir/junit.xml"

set +e
"$python" -m pytest "$repo/tests/interop" -q --junitxml="$junit" -o junit_family=xunit2 "$@"
rc=$?
set -e

if [[ $rc -eq 5 ]]; then
    echo "test-interop: FAILED: pytest collected no tests" >&2
    exit 1
fi
if [[ ! -s "$junit" ]]; then
    echo "test-interop: FAILED: pytest wrote no report (exit $rc)" >&2
    exit $(( rc == 0 ? 1 : rc ))
fi

allowed_file="$workdir/allowed-skips.txt"
: > "$allowed_file"
for id in "${!ALLOWED_SKIPS[@]}"; do
    printf '%s\n' "$id" >> "$allowed_file"
done

# Every skipped test case (skip, skipif, importorskip, xfail) that is not allowed is a failure.
set +e
"$python" - "$junit" "$allowed_file" <<'PY'
import sys
import xml.etree.ElementTree as ET

junit, allowed_path = sys.argv[1], sys.argv[2]
allowed = {line.strip() for line in open(allowed_path) if line.strip()}
bad = []
total = 0
for case in ET.parse(junit).iter("testcase"):
    total += 1
    skipped = case.find("skipped")
    if skipped is None:
        continue
    node = f"{case.get('classname', '')}::{case.get('name', '')}"
    if not any(node.endswith(a) or a in node for a in allowed):
        bad.append(f"{node}: {skipped.get('message', '')}")
if total == 0:
    print("test-interop: FAILED: the report lists no test cases", file=sys.stderr)
    sys.exit(1)
if bad:
    print(f"test-interop: FAILED: {len(bad)} test(s) skipped without an allowed reason:", file=sys.stderr)
    for line in bad:
        print(f"  {line}", file=sys.stderr)
    sys.exit(1)
PY
skip_rc=$?
set -e

if [[ $rc -ne 0 ]]; then
    echo "test-interop: FAILED (pytest exit $rc)" >&2
    exit "$rc"
fi
if [[ $skip_rc -ne 0 ]]; then
    exit 1
fi
echo "test-interop: all interop tests passed" >&2
