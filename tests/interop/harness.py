"""Process-level harness for the interop tests: starts and stops twinhub, hands out addresses.

Used by conftest.py (fixtures) and the test modules (SAS tokens, raw REST calls, error-body
checks). Talks to the hub only through its public surface: the `serve` and
`connection-string` commands, HTTPS on the REST port, and the files it writes in its data dir.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import requests

REPO = Path(__file__).resolve().parents[2]
API_VERSION = "2021-04-12"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 20.0
POLICIES = ("iothubowner", "service", "registryRead", "registryReadWrite", "device")

# Variables that would override our trust settings if a machine sets them globally.
TRUST_VARS_REMOVED = ("CURL_CA_BUNDLE", "SSL_CERT_DIR")
TRUST_VARS_SET = ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
# The machine's own values, so the hub process sees the real system trust settings rather
# than the test process's session bundle (it builds tls/ca-bundle.pem from system roots).
_ORIGINAL_TRUST_ENV: dict[str, str | None] = {}

_CS_RE = re.compile(
    r"^HostName=(?P<host>[^;]+);SharedAccessKeyName=(?P<name>[^;]+);SharedAccessKey=(?P<key>[^;]+)$"
)


class HubError(AssertionError):
    """The hub failed to start, stop or answer a CLI call; the message carries its log."""


def hub_binary() -> Path:
    """The binary under test: $TWINHUB_BIN, else <repo>/target/debug/twinhub."""
    env = os.environ.get("TWINHUB_BIN")
    return Path(env) if env else REPO / "target" / "debug" / "twinhub"


def unique_id(prefix: str = "dev") -> str:
    """A device id no other test uses, so tests sharing a hub never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def random_key(nbytes: int = 32) -> str:
    return base64.b64encode(os.urandom(nbytes)).decode()


# --------------------------------------------------------------------------------------------
# Loopback addresses
# --------------------------------------------------------------------------------------------


def port_free(ip: str, port: int) -> bool:
    """True when nothing is bound to ip:port (nor to the wildcard address on that port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Same option the hub's listener uses, so TIME_WAIT leftovers do not count as "bound".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                return False
            raise
    return True


class AddressAllocator:
    """Hands out 127.0.x.y addresses, starting at 127.0.0.10, skipping any with a port taken.

    Each hub gets its own address so that every hub can use the fixed ports 443 and 8883 the
    device SDK dials. Addresses are never reused within one test session.
    """

    def __init__(self, start: int = 10, ports: Iterable[int] = (443, 8883, 5671)) -> None:
        self._next = start
        self._ports = tuple(ports)
        self._lock = threading.Lock()

    def allocate(self, extra_ports: Iterable[int] = ()) -> str:
        ports = self._ports + tuple(extra_ports)
        with self._lock:
            # 127.0.0.0/8 minus network/broadcast-looking last octets: 254 * 256 candidates.
            while self._next < 256 * 256:
                n = self._next
                self._next += 1
                hi, lo = divmod(n, 256)
                if lo in (0, 255):
                    continue
                ip = f"127.0.{hi}.{lo}"
                if all(port_free(ip, p) for p in ports):
                    return ip
        raise HubError("no free loopback address left in 127.0.0.0/16")


# --------------------------------------------------------------------------------------------
# Trust: the test process trusts the hub the current test talks to
# --------------------------------------------------------------------------------------------


class ProcessTrust:
    """Points REQUESTS_CA_BUNDLE and SSL_CERT_FILE of the test process at one hub's bundle.

    Every hub has its own dev CA, and they all share one subject name; with several of them
    in a single bundle OpenSSL may pick the wrong same-named CA and fail the signature check.
    So the process trusts one hub at a time: the hub being started, the hub a test uses
    (conftest's pytest_runtest_call), or the hub a device client is built for. The in-process
    SDKs read these variables when they build a TLS context.
    """

    def __init__(self) -> None:
        self.current: Path | None = None

    def apply_baseline(self) -> None:
        for var in TRUST_VARS_REMOVED + TRUST_VARS_SET:
            _ORIGINAL_TRUST_ENV.setdefault(var, os.environ.get(var))
        for var in TRUST_VARS_REMOVED:
            os.environ.pop(var, None)
        system = _system_bundle()
        for var in TRUST_VARS_SET:
            if system is not None:
                os.environ[var] = str(system)
            else:
                os.environ.pop(var, None)

    def use(self, bundle: Path) -> None:
        for var in TRUST_VARS_REMOVED:
            os.environ.pop(var, None)
        for var in TRUST_VARS_SET:
            os.environ[var] = str(bundle)
        self.current = bundle


TRUST = ProcessTrust()
_HUBS_BY_HOST: dict[str, "Hub"] = {}


def hub_for_host(host: str) -> "Hub | None":
    """The hub serving a connection string's HostName (with or without :port)."""
    return _HUBS_BY_HOST.get(host) or _HUBS_BY_HOST.get(host.rsplit(":", 1)[0])


def _system_bundle() -> Path | None:
    for candidate in (
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ):
        p = Path(candidate)
        if p.is_file():
            return p
    return None


# --------------------------------------------------------------------------------------------
# SAS tokens and connection strings
# --------------------------------------------------------------------------------------------


def sign(key_b64: str, string_to_sign: str) -> str:
    mac = hmac.new(base64.b64decode(key_b64), string_to_sign.encode("utf-8"), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def service_sas(host: str, policy: str, key_b64: str, se: int) -> str:
    """A service token exactly as azure-iot-hub builds it (sr = quote_plus(host))."""
    sr = urllib.parse.quote_plus(host)
    sig = urllib.parse.quote(sign(key_b64, f"{sr}\n{se}"))
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={policy}"


def device_sas(host: str, device_id: str, key_b64: str, se: int) -> str:
    """A device token exactly as azure-iot-device builds it (sr = quote(uri, safe=''))."""
    sr = urllib.parse.quote(f"{host}/devices/{device_id}", safe="")
    sig = urllib.parse.quote(sign(key_b64, f"{sr}\n{se}"), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}"


@dataclass(frozen=True)
class ServiceCredentials:
    host: str
    policy: str
    key: str

    @classmethod
    def parse(cls, cs: str) -> "ServiceCredentials":
        m = _CS_RE.match(cs.strip())
        if not m:
            raise HubError(f"not a service connection string: {cs!r}")
        return cls(m["host"], m["name"], m["key"])

    def connection_string(self) -> str:
        return f"HostName={self.host};SharedAccessKeyName={self.policy};SharedAccessKey={self.key}"

    def token(self, ttl: int = 3600, se: int | None = None) -> str:
        return service_sas(self.host, self.policy, self.key, se if se is not None else int(time.time()) + ttl)


# --------------------------------------------------------------------------------------------
# Error bodies
# --------------------------------------------------------------------------------------------


def error_codes_in(body_text: str) -> set[int]:
    """Every numeric IoT Hub error code found in an error body, wherever the hub put it.

    Real IoT Hub uses two layouts: {"Message": "ErrorCode:Name;...", ...} and
    {"Message": "{\\"errorCode\\":404103,...}", ...}; some gateways put errorCode at the top.
    """
    codes: set[int] = set()
    try:
        body = json.loads(body_text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("errorCode", "ErrorCode"):
            if isinstance(body.get(key), int):
                codes.add(body[key])
        msg = body.get("Message")
        if isinstance(msg, str):
            try:
                inner = json.loads(msg)
            except ValueError:
                inner = None
            if isinstance(inner, dict) and isinstance(inner.get("errorCode"), int):
                codes.add(inner["errorCode"])
        if isinstance(msg, str):
            # Only numbers labelled as codes: tracking ids and device ids hold digit runs too.
            codes.update(int(c) for c in re.findall(r"(?i)error\s*code\W{0,3}([1-5]\d{5})(?!\d)", msg))
    return codes


def assert_iothub_error(
    resp: requests.Response, status: int, code: int | None = None, name: str | None = None
) -> dict[str, Any]:
    """Asserts an IoT Hub style error response and returns its parsed body.

    Checks the status, a JSON body with the Message/ExceptionMessage envelope, the
    `iothub-errorcode` header, and the numeric code in the body. With code=None any code of
    the same HTTP status family (status*1000 + n) is accepted.
    """
    __tracebackhide__ = True
    detail = f"{resp.request.method} {resp.url} -> {resp.status_code} {resp.text[:500]!r}"
    assert resp.status_code == status, detail
    ctype = resp.headers.get("Content-Type", "")
    assert "application/json" in ctype, f"error content-type {ctype!r}; {detail}"
    body = resp.json()
    assert isinstance(body, dict), detail
    assert isinstance(body.get("Message"), str) and body["Message"], f"no Message; {detail}"
    assert "ExceptionMessage" in body, f"no ExceptionMessage; {detail}"
    header = resp.headers.get("iothub-errorcode")
    assert header, f"no iothub-errorcode header; {detail}"
    if name is not None:
        assert header == name, f"iothub-errorcode {header!r} != {name!r}; {detail}"
    codes = error_codes_in(resp.text)
    if code is not None:
        assert code in codes, f"error code {code} not in body (found {sorted(codes)}); {detail}"
    else:
        family = [c for c in codes if c // 1000 == status]
        assert family, f"no {status}xxx error code in body (found {sorted(codes)}); {detail}"
    return body


class StatusRecorder:
    """A requests response hook for msrest: records the status of every call the SDK makes.

    The service SDK hides the status of a successful call; this lets the tests assert the
    exact success code (e.g. 204 for delete), not just "no exception".
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.calls.append((response.request.method, response.url, response.status_code))

    @property
    def last(self) -> int:
        assert self.calls, "no HTTP call was recorded"
        return self.calls[-1][2]

    def last_call(self) -> tuple[str, str, int]:
        assert self.calls, "no HTTP call was recorded"
        return self.calls[-1]


# --------------------------------------------------------------------------------------------
# The hub process
# --------------------------------------------------------------------------------------------


class Hub:
    """One twinhub process on its own loopback address with its own data dir."""

    def __init__(
        self,
        *,
        binary: Path,
        ip: str,
        workdir: Path,
        https_port: int = 443,
        mqtt_port: int = 8883,
        mqtt_connect_timeout: float | None = None,
        extra_args: Iterable[str] = (),
        hostname: str | None = None,
        name: str | None = None,
    ) -> None:
        self.binary = binary
        self.ip = ip
        # What clients put in HostName and SAS tokens carry: the bind address, unless the hub
        # is a node of a cluster behind a load balancer whose address it is.
        self.hostname = hostname or ip
        self.name = name or ip
        self.https_port = https_port
        self.mqtt_port = mqtt_port
        self.mqtt_connect_timeout = mqtt_connect_timeout
        self.extra_args = tuple(extra_args)
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._expected_exit = False
        self._cs_cache: dict[str, str] = {}
        self._log_file = None

    # ---- paths and addresses ---------------------------------------------------------------

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def ca_pem(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def ca_bundle(self) -> Path:
        return self.tls_dir / "ca-bundle.pem"

    @property
    def rest_host(self) -> str:
        """The HostName a service connection string carries (with :port when not 443)."""
        return self.hostname if self.https_port == 443 else f"{self.hostname}:{self.https_port}"

    @property
    def base_url(self) -> str:
        return f"https://{self.rest_host}"

    @property
    def own_url(self) -> str:
        """HTTPS on this process's own address (a cluster node's, not the load balancer's)."""
        return f"https://{self.ip}" if self.https_port == 443 else f"https://{self.ip}:{self.https_port}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        named = "" if self.name == self.ip else f"{self.name} "
        return f"<Hub {named}{self.ip} https={self.https_port} mqtt={self.mqtt_port} {state}>"

    # ---- lifecycle -------------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            str(self.binary),
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--hostname",
            self.hostname,
            "--bind",
            self.ip,
            "--https-port",
            str(self.https_port),
            "--mqtt-port",
            str(self.mqtt_port),
        ]
        if self.mqtt_connect_timeout is not None:
            cmd += ["--mqtt-connect-timeout", _fmt_secs(self.mqtt_connect_timeout)]
        cmd += list(self.extra_args)
        return cmd

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "Hub":
        if self.running:
            raise HubError(f"{self!r} is already running")
        if not self.binary.is_file():
            raise HubError(
                f"twinhub binary not found at {self.binary} "
                "(build it with `cargo build -p twinhub` or set TWINHUB_BIN)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        self._log_file = self.log_path.open("ab")
        banner = f"\n===== start #{self.starts}: {' '.join(self.command())}\n"
        self._log_file.write(banner.encode())
        self._log_file.flush()
        self._expected_exit = False
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=_hub_process_env(),
            cwd=str(self.workdir),
        )
        self._wait_ready()
        _HUBS_BY_HOST[self.hostname] = self
        TRUST.use(self.ca_bundle)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last_err: str = "no attempt made"
        url = f"https://{self.ip}:{self.https_port}/health"
        while time.monotonic() < deadline:
            assert self.proc is not None
            rc = self.proc.poll()
            if rc is not None:
                self._close_log()
                raise HubError(f"twinhub exited with code {rc} before becoming ready\n{self.log_tail()}")
            if self.ca_pem.is_file():
                try:
                    r = requests.get(url, verify=str(self.ca_pem), timeout=2)
                    if r.status_code == 200:
                        return
                    last_err = f"/health answered {r.status_code}: {r.text[:200]!r}"
                except requests.RequestException as e:
                    last_err = f"{type(e).__name__}: {e}"
            else:
                last_err = f"{self.ca_pem} does not exist yet"
            time.sleep(0.1)
        self._hard_kill()
        raise HubError(
            f"twinhub did not become ready within {READY_TIMEOUT_S:.0f}s "
            f"(last: {last_err})\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Graceful stop. Returns the exit code; raises if the hub ignores the signal."""
        if self.proc is None:
            raise HubError(f"{self!r} was never started")
        self._expected_exit = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._hard_kill()
                raise HubError(
                    f"twinhub did not exit within {timeout:.0f}s of {signal.Signals(sig).name}; "
                    f"killed it\n{self.log_tail()}"
                ) from None
        self._close_log()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL: nothing acknowledged before this may be lost."""
        if self.proc is None:
            raise HubError(f"{self!r} was never started")
        self._expected_exit = True
        self._hard_kill()
        self._close_log()
        assert self.proc.returncode is not None
        return self.proc.returncode

    def restart(self, *, kill: bool = False) -> int:
        """Stops (gracefully, or with SIGKILL) and starts again on the same dir and address.

        Returns the exit code of the stop, so a test can assert a graceful one.
        """
        rc = self.kill() if kill else self.stop()
        self.start()
        return rc

    def _hard_kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def died_unexpectedly(self) -> int | None:
        """The exit code if the hub exited without the harness asking it to."""
        if self.proc is None or self._expected_exit:
            return None
        return self.proc.poll()

    def teardown(self) -> None:
        """Always leaves the process gone; raises if it had crashed or would not stop."""
        if self.proc is None:
            return
        crashed = self.died_unexpectedly()
        if self.running:
            self.stop()
        self._close_log()
        if crashed is not None:
            raise HubError(f"twinhub exited on its own with code {crashed}\n{self.log_tail()}")

    def log_tail(self, lines: int = 150) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        tail = text.splitlines()[-lines:]
        return f"--- {self.log_path} (last {len(tail)} lines) ---\n" + "\n".join(tail)

    # ---- CLI, credentials ------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        """Runs `twinhub <args>` and returns its stdout; fails with its stderr."""
        try:
            res = subprocess.run(
                [str(self.binary), *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=CLI_TIMEOUT_S,
                env=_hub_process_env(),
                cwd=str(self.workdir),
            )
        except subprocess.TimeoutExpired as e:
            raise HubError(f"`twinhub {' '.join(args)}` timed out after {CLI_TIMEOUT_S}s") from e
        if res.returncode != 0:
            raise HubError(
                f"`twinhub {' '.join(args)}` exited {res.returncode}\n"
                f"stdout: {res.stdout.decode(errors='replace')}\n"
                f"stderr: {res.stderr.decode(errors='replace')}"
            )
        return res.stdout.decode()

    def connection_string_cli(self, policy: str | None = None) -> str:
        args = ["connection-string", "--data-dir", str(self.data_dir)]
        if policy is not None:
            args += ["--policy", policy]
        out = self.cli(*args)
        lines = [line for line in out.splitlines() if line.strip()]
        if len(lines) != 1:
            raise HubError(f"connection-string printed {len(lines)} lines, expected 1: {out!r}")
        return lines[0].strip()

    def service_cs(self, policy: str = "iothubowner") -> str:
        """The service connection string for a policy (cached: keys persist across restarts)."""
        if policy not in self._cs_cache:
            self._cs_cache[policy] = self.connection_string_cli(policy)
        return self._cs_cache[policy]

    def credentials(self, policy: str = "iothubowner") -> ServiceCredentials:
        return ServiceCredentials.parse(self.service_cs(policy))

    def registry(self, policy: str = "iothubowner", cs: str | None = None, transport_type: Any = None):
        """An IoTHubRegistryManager with a StatusRecorder attached as `.recorder`.

        `transport_type` (a uamqp.TransportType) is the SDK's own choice for send_c2d_message:
        AMQP/TLS on 5671 (the default) or AMQP over WebSockets on 443.
        """
        from azure.iot.hub import IoTHubRegistryManager

        if transport_type is None:
            rm = IoTHubRegistryManager.from_connection_string(cs or self.service_cs(policy))
        else:
            rm = IoTHubRegistryManager.from_connection_string(
                cs or self.service_cs(policy), transport_type=transport_type
            )
        # Explicit, so a registry manager keeps working whichever hub the env points at.
        rm.protocol.config.connection.verify = str(self.ca_bundle)
        rec = StatusRecorder()
        rm.protocol.config.hooks.append(rec)
        rm.recorder = rec  # type: ignore[attr-defined]
        for name in dir(type(rm)):
            attr = getattr(rm, name)
            if not name.startswith("_") and callable(attr):
                setattr(rm, name, _explaining_http_errors(attr))
        return rm

    def device_cs(self, device_id: str, *, status: str = "enabled") -> str:
        """A device connection string; creates the device (hub-generated keys) if needed."""
        from msrest.exceptions import HttpOperationError

        rm = self.registry()
        try:
            dev = rm.get_device(device_id)
        except HttpOperationError as e:
            if e.response is None or e.response.status_code != 404:
                raise
            dev = rm.create_device_with_sas(device_id, None, None, status)
        key = dev.authentication.symmetric_key.primary_key
        if not key:
            raise HubError(f"device {device_id} has no primary key: {dev.as_dict()}")
        return self.device_cs_for(device_id, key)

    def device_cs_for(self, device_id: str, key: str) -> str:
        return f"HostName={self.hostname};DeviceId={device_id};SharedAccessKey={key}"

    def device_key(self, device_id: str) -> str:
        cs = self.device_cs(device_id)
        return cs.split("SharedAccessKey=", 1)[1]

    def trust_process(self) -> None:
        """Makes the test process trust this hub (for SDK objects created afterwards)."""
        TRUST.use(self.ca_bundle)

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that must trust this hub through variables only."""
        env = dict(os.environ)
        for var in TRUST_VARS_REMOVED:
            env.pop(var, None)
        env["REQUESTS_CA_BUNDLE"] = str(self.ca_bundle)
        env["SSL_CERT_FILE"] = str(self.ca_bundle)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # ---- raw REST --------------------------------------------------------------------------

    def rest(
        self,
        method: str,
        path: str,
        *,
        policy: str = "iothubowner",
        token: str | None = None,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        params: dict[str, str] | None = None,
        auth: bool = True,
    ) -> requests.Response:
        """A REST call shaped like the service SDK's, for checks the SDK cannot express."""
        hdrs = {"Accept": "application/json"}
        if auth:
            hdrs["Authorization"] = token or self.credentials(policy).token()
        if headers:
            hdrs.update(headers)
        query = {"api-version": API_VERSION}
        if params:
            query.update(params)
        return requests.request(
            method,
            self.base_url + path,
            params=query,
            headers=hdrs,
            json=json_body,
            verify=str(self.ca_bundle),
            timeout=30,
        )


def _explaining_http_errors(method):
    """Wraps an SDK method so its HttpOperationError message carries the hub's answer.

    The exception type is unchanged (tests still catch HttpOperationError); only the text
    gains the status, the iothub-errorcode header and the body.
    """
    from msrest.exceptions import HttpOperationError

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        try:
            return method(*args, **kwargs)
        except HttpOperationError as e:
            r = e.response
            if r is not None and e.args and "iothub-errorcode=" not in str(e):
                e.args = (
                    f"{e.args[0]}: {r.request.method} {r.url} -> {r.status_code} "
                    f"iothub-errorcode={r.headers.get('iothub-errorcode')!r} body={r.text[:500]!r}",
                ) + tuple(e.args[1:])
                e.message = e.args[0]
            raise

    wrapper.__name__ = getattr(method, "__name__", "sdk_method")
    wrapper.__doc__ = getattr(method, "__doc__", None)
    return wrapper


def sdk_call(call, *args: Any, **kwargs: Any) -> Any:
    """Runs a service-SDK call; on HttpOperationError fails with the hub's status and body.

    The SDK's own message only says "invalid status code 'Not Found'", which hides the
    IoT Hub error code a hub bug report needs.
    """
    __tracebackhide__ = True
    from msrest.exceptions import HttpOperationError

    try:
        return call(*args, **kwargs)
    except HttpOperationError as e:
        r = e.response
        if r is None:
            raise
        raise AssertionError(
            f"{r.request.method} {r.url} -> {r.status_code} "
            f"iothub-errorcode={r.headers.get('iothub-errorcode')!r} body={r.text[:500]!r}"
        ) from e


def _hub_process_env() -> dict[str, str]:
    env = dict(os.environ)
    for var, value in _ORIGINAL_TRUST_ENV.items():
        if value is None:
            env.pop(var, None)
        else:
            env[var] = value
    env.setdefault("RUST_BACKTRACE", "1")
    # The log goes to a file that is pasted into failure reports: no ANSI colours.
    env["NO_COLOR"] = "1"
    return env


def _fmt_secs(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Polls predicate() until it returns a truthy value; bounded. Returns that value."""
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def connect_refused(client, timeout_s: float) -> BaseException:
    """client.connect() in a thread, bounded by timeout_s; returns what it raised (fails the
    test if it connected or neither succeeded nor failed in time)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            client.connect()
            box["ok"] = True
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"connect() neither succeeded nor failed within {timeout_s}s"
    assert "ok" not in box, "the hub accepted the connection"
    return box["error"]


def shutdown_bounded(client: Any, timeout: float = 20.0) -> None:
    """client.shutdown() can block on a dead hub; never let it hang the suite."""
    t = threading.Thread(target=client.shutdown, daemon=True)
    t.start()
    t.join(timeout)
