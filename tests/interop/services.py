"""Private PostgreSQL, nats-server (JetStream) and HAProxy for the cluster tests, on loopback.

Each service runs from Debian's packaged binaries (`scripts/debian-services.sh` installs them)
in a temporary directory of its own that holds its configuration, data and log, and is
stopped with bounded waits (`stop()` never hangs: a server that ignores its stop signal is
killed). Nothing is skipped: a missing binary is an error that says how to install it.

- `PgServer`: `initdb` + `pg_ctl` as the `postgres` user (through `setpriv`, since both refuse
  to run as root), on 127.0.0.1 and a free port, fsync on; `fresh_database()` hands out a new
  database; `restart()` stops (fast shutdown) and starts it again on the same port and data.
  A small `sh` supervisor holds a pipe only this process writes to: however the test process
  ends, the pipe closes and the supervisor stops the server and removes the directory.
- `NatsServer`: `nats-server -js` with a config file (`max_payload: 8MB`: the hub's events
  can be up to 1 MiB), on 127.0.0.1 and a free port; `restart()` keeps port and JetStream store.
- `HaProxy`: TCP mode in front of a set of backends, one frontend per port on one address.

nats-server and haproxy run as children of this process with a parent-death signal
(`setpriv --pdeathsig`), so they cannot outlive it either.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

INSTALL_HINT = "run scripts/debian-services.sh (as root) to install PostgreSQL, nats-server and haproxy"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
PG_CTL_WAIT_S = 60
PG_TOOLS = ("initdb", "pg_ctl", "postgres", "psql", "pg_isready")
# libpq reads these; a developer's settings must not leak into the private server's tools.
PG_ENV_REMOVED = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGSERVICE",
    "PGDATA",
)


class ServiceError(AssertionError):
    """A service failed to start, stop or answer; the message carries its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on host a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return f"--- {path} (last {len(tail)} lines) ---\n" + "\n".join(tail)


def _find_binary(name: str, debian_path: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    if Path(debian_path).is_file():
        return debian_path
    raise ServiceError(f"{name} is not installed (neither on PATH nor at {debian_path}): {INSTALL_HINT}")


def _setpriv() -> str:
    found = shutil.which("setpriv")
    if not found:
        raise ServiceError("setpriv (util-linux) is missing; it is part of every Debian install")
    return found


def _stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S
) -> None:
    """Signals a child and waits, bounded; kills it if it ignores the signal."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _wait_tcp(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------

# $1 directory, $2 data directory, $3 pg_ctl, $4 setpriv (empty when not root). Signals aimed
# at the test's process group must not stop the supervisor before it has cleaned up.
_PG_SUPERVISOR = r"""
trap '' INT TERM HUP QUIT
cat >/dev/null
if [ -f "$2/postmaster.pid" ]; then
  if [ -n "$4" ]; then
    "$4" --reuid=postgres --regid=postgres --init-groups \
      "$3" -D "$2" -m immediate -w -t 30 stop >/dev/null 2>&1
  else
    "$3" -D "$2" -m immediate -w -t 30 stop >/dev/null 2>&1
  fi
fi
rm -rf "$1"
"""


def _pg_bin_dir() -> Path:
    env = os.environ.get("TWINHUB_PG_BINDIR")
    if env:
        if (Path(env) / "pg_ctl").is_file():
            return Path(env)
        raise ServiceError(f"TWINHUB_PG_BINDIR={env} holds no pg_ctl")

    def version(p: str) -> list[int]:
        name = Path(p).parent.name
        return [int(x) if x.isdigit() else 0 for x in name.split(".")]

    candidates = [
        Path(p)
        for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version)
        if all((Path(p) / tool).is_file() for tool in PG_TOOLS)
    ]
    if not candidates:
        raise ServiceError(
            f"the PostgreSQL server binaries ({', '.join(PG_TOOLS)}) are not under "
            f"/usr/lib/postgresql/*/bin: {INSTALL_HINT}"
        )
    return candidates[-1]


class PgServer:
    """A private PostgreSQL cluster on 127.0.0.1 in a temporary directory."""

    HOST = "127.0.0.1"
    SUPERUSER = "postgres"

    def __init__(self) -> None:
        self.bin = _pg_bin_dir()
        self.as_root = os.geteuid() == 0
        # As root the postgres user must reach the directory: /tmp, not a TMPDIR under /root.
        base = "/tmp" if self.as_root else None
        self.dir = Path(tempfile.mkdtemp(prefix="twinhub-interop-pg-", dir=base))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.port = 0
        self._databases = 0
        self._supervisor: subprocess.Popen[bytes] | None = None
        self.running = False

    # ---- commands --------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in PG_ENV_REMOVED:
            env.pop(var, None)
        return env

    def _tool(self, name: str) -> list[str]:
        program = str(self.bin / name)
        if self.as_root:
            return [_setpriv(), "--reuid=postgres", "--regid=postgres", "--init-groups", program]
        return [program]

    def _run(self, args: Sequence[str], what: str, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                list(args),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                cwd=str(self.dir),
                env=self._env(),
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise ServiceError(f"{what} did not finish within {timeout}s\n{self.log_tail()}") from e

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> "PgServer":
        if self.as_root:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise ServiceError(f"no postgres system user: {INSTALL_HINT}") from None
        self._supervisor = subprocess.Popen(
            [
                "sh",
                "-c",
                _PG_SUPERVISOR,
                "twinhub-pg-supervisor",
                str(self.dir),
                str(self.data),
                str(self.bin / "pg_ctl"),
                _setpriv() if self.as_root else "",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=self._env(),
        )
        if self.as_root:
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        res = self._run(
            self._tool("initdb")
            + [
                "-D",
                str(self.data),
                "-U",
                self.SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            "initdb",
            120,
        )
        if res.returncode != 0:
            raise ServiceError(f"initdb failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        socket_dir = str(self.dir).replace("'", "''")
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(
                "\n# twinhub interop tests\n"
                f"listen_addresses = '{self.HOST}'\n"
                f"unix_socket_directories = '{socket_dir}'\n"
                "fsync = on\nsynchronous_commit = on\nmax_connections = 300\nshared_buffers = 32MB\n"
            )
        (self.data / "pg_hba.conf").write_text(f"local all all trust\nhost all all {self.HOST}/32 trust\n")
        last = ""
        for _ in range(5):
            self.port = free_port(self.HOST)
            with (self.data / "postgresql.conf").open("a") as f:
                f.write(f"port = {self.port}\n")
            ok, last = self._pg_ctl_start()
            if ok:
                self._wait_ready()
                self.running = True
                return self
            if "could not bind" not in last and "in use" not in last:
                break
        raise ServiceError(f"PostgreSQL did not start:\n{last}")

    def _pg_ctl_start(self) -> tuple[bool, str]:
        res = self._run(
            self._tool("pg_ctl")
            + ["-D", str(self.data), "-l", str(self.log_path), "-w", "-t", str(PG_CTL_WAIT_S), "start"],
            "pg_ctl start",
            PG_CTL_WAIT_S + 15,
        )
        if res.returncode == 0:
            return True, ""
        return False, f"pg_ctl start: {res.stdout}{res.stderr}\n{self.log_tail()}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            res = self._run(
                [str(self.bin / "pg_isready"), "-q", "-h", self.HOST, "-p", str(self.port), "-t", "2"],
                "pg_isready",
                10,
            )
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"PostgreSQL on {self.HOST}:{self.port} did not accept connections within "
                    f"{READY_TIMEOUT_S:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stops the server (fast: sessions ended, nothing committed lost); keeps the data."""
        res = self._run(
            self._tool("pg_ctl") + ["-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop"],
            "pg_ctl stop",
            45,
        )
        if res.returncode != 0:
            raise ServiceError(
                f"pg_ctl stop failed ({res.returncode}): {res.stdout}{res.stderr}\n{self.log_tail()}"
            )
        self.running = False

    def start_again(self) -> None:
        ok, log = self._pg_ctl_start()
        if not ok:
            raise ServiceError(f"PostgreSQL did not start again:\n{log}")
        self._wait_ready()
        self.running = True

    def restart(self) -> None:
        self.stop()
        self.start_again()

    def close(self) -> None:
        """Stops the server and removes its directory (the supervisor does both), bounded."""
        sup = self._supervisor
        if sup is None:
            return
        self._supervisor = None
        self.running = False
        try:
            if sup.stdin is not None:
                sup.stdin.close()
            sup.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait(timeout=5)
            raise ServiceError(
                f"the PostgreSQL supervisor did not finish within 60s (dir {self.dir})"
            ) from None

    # ---- databases -------------------------------------------------------------------------

    def psql(self, database: str, sql: str) -> str:
        res = self._run(
            [
                str(self.bin / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.dir),
                "-p",
                str(self.port),
                "-U",
                self.SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            "psql",
            30,
        )
        if res.returncode != 0:
            raise ServiceError(f"psql failed ({res.returncode}): {res.stderr}\nSQL: {sql}\n{self.log_tail()}")
        return res.stdout

    def fresh_database(self, prefix: str = "cluster") -> str:
        """Creates a new, empty database and returns its postgres:// URL."""
        self._databases += 1
        name = re.sub(r"[^a-z0-9_]", "_", f"{prefix}_{self._databases}".lower())
        self.psql("postgres", f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgres://{self.SUPERUSER}@{self.HOST}:{self.port}/{database}"


# --------------------------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------------------------


class NatsServer:
    """A nats-server with JetStream on 127.0.0.1, in a temporary directory."""

    HOST = "127.0.0.1"
    MAX_PAYLOAD = "8MB"

    def __init__(self) -> None:
        self.binary = _find_binary("nats-server", "/usr/sbin/nats-server")
        self.dir = Path(tempfile.mkdtemp(prefix="twinhub-interop-nats-"))
        self.log_path = self.dir / "server.log"
        self.port = free_port(self.HOST)
        self.proc: subprocess.Popen[bytes] | None = None
        (self.dir / "nats.conf").write_text(
            "# Written by the twinhub interop tests for one cluster.\n"
            f'listen: "{self.HOST}:{self.port}"\n'
            f"max_payload: {self.MAX_PAYLOAD}\n"
            f'jetstream {{\n  store_dir: "{self.dir / "jetstream"}"\n}}\n'
        )

    @property
    def url(self) -> str:
        return f"nats://{self.HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def start(self) -> "NatsServer":
        if self.running:
            raise ServiceError("nats-server is already running")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [_setpriv(), "--pdeathsig", "TERM", self.binary, "-c", str(self.dir / "nats.conf")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.dir),
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "not tried"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"nats-server exited with {self.proc.returncode}\n{self.log_tail()}")
            last = self._probe()
            if last == "ok":
                return self
            time.sleep(0.05)
        self.stop()
        raise ServiceError(
            f"nats-server on {self.HOST}:{self.port} did not announce JetStream within "
            f"{READY_TIMEOUT_S:.0f}s (last: {last})\n{self.log_tail()}"
        )

    def _probe(self) -> str:
        """'ok' once the server greets with an INFO line announcing JetStream."""
        try:
            with socket.create_connection((self.HOST, self.port), timeout=0.5) as s:
                s.settimeout(2)
                data = b""
                while b"\r\n" not in data and len(data) < 65536:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        line = data.split(b"\r\n", 1)[0].decode(errors="replace")
        if not line.startswith("INFO "):
            return f"unexpected greeting {line[:100]!r}"
        return "ok" if '"jetstream":true' in line else "JetStream not announced yet"

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# HAProxy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    ip: str


class HaProxy:
    """HAProxy in TCP mode: on `ip`, one frontend per port, round robin over the backends.

    Health checks (`inter 500ms fall 2 rise 2`) take a dead node out of the pool within about a
    second; `option redispatch` with `retries` sends a connection whose first server refuses it
    to another. Client and server timeouts are an hour, so idle MQTT and AMQP connections
    stay. `option tcplog` with `logasap` logs every connection as it is made, with the server
    it went to (`log_path`).
    """

    def __init__(self, ip: str, ports: Iterable[int], backends: Sequence[Backend]) -> None:
        self.binary = _find_binary("haproxy", "/usr/sbin/haproxy")
        self.ip = ip
        self.ports = tuple(ports)
        self.backends = tuple(backends)
        self.dir = Path(tempfile.mkdtemp(prefix="twinhub-interop-haproxy-"))
        self.config_path = self.dir / "haproxy.cfg"
        self.log_path = self.dir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path.write_text(self.config())

    def config(self) -> str:
        lines = [
            "# Written by the twinhub interop tests: a TCP load balancer in front of a cluster.",
            "global",
            "    maxconn 4096",
            "    log stdout format raw local0 info",
            "",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    option logasap",
            "    option redispatch",
            "    retries 3",
            "    timeout connect 2s",
            "    timeout client 1h",
            "    timeout server 1h",
            "    timeout check 2s",
            "",
        ]
        for port in self.ports:
            lines += [
                f"frontend fe_{port}",
                f"    bind {self.ip}:{port}",
                f"    default_backend be_{port}",
                "",
                f"backend be_{port}",
                "    balance roundrobin",
            ]
            for b in self.backends:
                lines.append(f"    server {b.name} {b.ip}:{port} check inter 500ms fall 2 rise 2")
            lines.append("")
        return "\n".join(lines)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def start(self) -> "HaProxy":
        check = subprocess.run(
            [self.binary, "-c", "-f", str(self.config_path)], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0:
            raise ServiceError(f"haproxy rejects its config:\n{check.stdout}{check.stderr}\n{self.config()}")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                # -db: stay in the foreground; -W would add a master process we do not need.
                [_setpriv(), "--pdeathsig", "TERM", self.binary, "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(self.dir),
            )
        for port in self.ports:
            if not _wait_tcp(self.ip, port, READY_TIMEOUT_S) or not self.running:
                self.stop()
                raise ServiceError(f"haproxy does not listen on {self.ip}:{port}\n{self.log_tail()}")
        return self

    def stop(self) -> None:
        # SIGTERM is HAProxy's hard stop: it does not wait for hour-long client connections.
        if self.proc is not None:
            _stop_process(self.proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def connections_by_server(self, port: int) -> dict[str, int]:
        """Connections logged so far through the port's frontend, per backend server."""
        counts: dict[str, int] = {}
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return counts
        for m in re.finditer(rf"\bfe_{port} be_{port}/(\S+)", text):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        return counts
