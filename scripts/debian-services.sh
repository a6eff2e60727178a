#!/usr/bin/env bash
# Installs the real services the tests start on loopback, from Debian's packages:
# PostgreSQL (the clustered store), nats-server (the cluster bus and JetStream event log) and
# HAProxy (the TCP load balancer in front of a test cluster). The tests start their own private
# instances in temporary directories; the packages' system services are not used, so they are
# stopped if the package started them.
set -euo pipefail

need=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)

if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "installing from Debian: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
# The package scripts must not start system-wide daemons on the default ports.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
