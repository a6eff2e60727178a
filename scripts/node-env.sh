#!/usr/bin/env bash
# Creates (or reuses) the Node.js packages for the interop tests and prints the path of their
# node_modules directory on stdout.
#
# The packages are those of tests/interop/node/package-lock.json (exact versions), installed
# with `npm ci` into ${TWINHUB_NODE_ENV:-<repo>/target/node-env}, outside the source tree. A
# stamp file holds a hash of the lock, package.json and the node version, so a second run with
# nothing changed returns at once. Any install error fails the script. On a fresh Debian
# machine without node or npm, they are installed with apt-get when running as root (as CI does).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$repo/tests/interop/node"
env_dir="${TWINHUB_NODE_ENV:-$repo/target/node-env}"
stamp="$env_dir/.twinhub-node-lock.sha256"

log() { printf 'node-env: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f "$src/package.json" ]] || die "missing $src/package.json"
[[ -f "$src/package-lock.json" ]] || die "missing $src/package-lock.json"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "node or npm not found on PATH, and apt-get is unavailable to install them"
    [[ "$(id -u)" == "0" ]] || die "node or npm not found on PATH; install them (apt-get install nodejs npm) or run as root"
    log "installing nodejs and npm with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    apt-get install -y -q nodejs npm >&2 || die "apt-get install nodejs npm failed"
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
        || die "nodejs and npm installed but node or npm is still not on PATH"
fi

# @azure/event-hubs 6 declares node >= 20.
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[[ "$node_major" -ge 20 ]] || die "node $(node --version) is too old: the pinned @azure/event-hubs needs node >= 20"

want="$( { cat "$src/package-lock.json" "$src/package.json"; node --version; } | sha256sum | cut -d' ' -f1)"

if [[ -d "$env_dir/node_modules" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$env_dir/node_modules"
    exit 0
fi

log "installing the locked packages into $env_dir"
mkdir -p "$env_dir"
rm -f "$stamp"
cp "$src/package.json" "$src/package-lock.json" "$env_dir/"
# npm ci removes any old node_modules first and fails if the lock and package.json disagree.
(cd "$env_dir" && npm ci --no-audit --no-fund --loglevel=error >&2) || die "npm ci in $env_dir failed"

# Catches a broken install before any test runs.
(cd "$env_dir" && node -e '
for (const name of ["@azure/event-hubs", "rhea", "rhea-promise", "ws", "azure-iothub", "azure-iot-common", "azure-iot-device", "azure-iot-device-http"]) require(name);
' >&2) || die "the installed packages do not load"

echo "$want" > "$stamp"
echo "$env_dir/node_modules"
