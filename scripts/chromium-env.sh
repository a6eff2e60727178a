#!/usr/bin/env bash
# Finds (or installs) the Chromium the web console's browser tests drive, and prints the path
# of its executable on stdout.
#
# The browser is Debian's `chromium` package, driven headless by playwright-core (installed by
# scripts/node-env.sh); Playwright's own browser downloads are never used. In order:
#   1. $TWINHUB_CHROMIUM, when set, must name an executable (no fallback: a wrong path fails);
#   2. `chromium` on PATH (Debian's /usr/bin/chromium launcher);
#   3. on a Debian machine without it, running as root (as CI does), `apt-get install chromium`.
# Anything else fails loudly: the browser tests never skip for want of a browser. The browser
# found must start and print its version.
set -euo pipefail

log() { printf 'chromium-env: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

check() {
    local exe="$1" version
    # The Debian launcher is a shell script that sources /etc/chromium.d; --version runs it
    # end to end without opening a window. Bounded: a broken install must not hang CI.
    version="$(timeout 60 "$exe" --version 2>/dev/null)" \
        || die "$exe does not run (\`$exe --version\` failed)"
    [[ "$version" == *Chromium* || "$version" == *Chrome* ]] \
        || die "$exe --version printed '$version', not a Chromium version"
    log "$version ($exe)"
}

if [[ -n "${TWINHUB_CHROMIUM:-}" ]]; then
    [[ -x "$TWINHUB_CHROMIUM" ]] || die "TWINHUB_CHROMIUM=$TWINHUB_CHROMIUM is not an executable"
    check "$TWINHUB_CHROMIUM"
    echo "$TWINHUB_CHROMIUM"
    exit 0
fi

if ! exe="$(command -v chromium)"; then
    command -v apt-get >/dev/null 2>&1 \
        || die "chromium is not on PATH and apt-get is unavailable to install it (set TWINHUB_CHROMIUM to a Chromium executable)"
    [[ "$(id -u)" == "0" ]] \
        || die "chromium is not on PATH; install Debian's package (apt-get install chromium) or run as root"
    log "installing Debian's chromium with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    # No recommends (they pull desktop daemons); fonts-liberation gives screenshots real text.
    apt-get install -y -q --no-install-recommends chromium fonts-liberation >&2 \
        || die "apt-get install chromium failed"
    exe="$(command -v chromium)" || die "chromium installed but still not on PATH"
fi

check "$exe"
echo "$exe"
