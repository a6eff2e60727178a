#!/usr/bin/env bash
# Creates (or reuses) the Python venv for the interop tests and prints its path on stdout.
#
# The venv lives at ${TWINHUB_VENV:-<repo>/target/python-venv}. A stamp file holds a hash of
# tests/interop/requirements.txt and the interpreter version, so a second run with nothing
# changed returns at once. Any install error fails the script. On a fresh Debian machine
# without the venv module, python3-venv is installed with apt-get (CI runs as root).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TWINHUB_VENV:-$repo/target/python-venv}"
req="$repo/tests/interop/requirements.txt"
stamp="$venv/.twinhub-requirements.sha256"

log() { printf 'python-env: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -f "$req" ]] || die "missing $req"
command -v python3 >/dev/null 2>&1 || die "python3 not found on PATH"

want="$( { cat "$req"; python3 -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$venv"
    exit 0
fi

# Debian splits venv/ensurepip into python3-venv; without it `python3 -m venv` fails.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "python3 has no venv/ensurepip module and apt-get is unavailable"
    [[ "$(id -u)" == "0" ]] || die "python3-venv is missing; install it (apt-get install python3-venv) or run as root"
    log "installing python3-venv with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    apt-get install -y -q python3-venv >&2 || die "apt-get install python3-venv failed"
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || die "python3-venv installed but venv/ensurepip still missing"
fi

log "creating venv at $venv"
mkdir -p "$(dirname "$venv")"
rm -f "$stamp"
python3 -m venv --clear "$venv" >&2 || die "python3 -m venv failed"

log "installing $(grep -cvE '^\s*(#|$)' "$req") pinned requirements"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$req" >&2 \
    || die "pip install -r $req failed"

# Catches a broken install (e.g. the missing six) before any test runs.
"$venv/bin/python" -c 'import azure.iot.device, azure.iot.hub, azure.eventhub, websocket, paho.mqtt.client, pytest, pytest_timeout' >&2 \
    || die "the installed packages do not import"

echo "$want" > "$stamp"
echo "$venv"
