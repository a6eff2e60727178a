"""Shared by the routing interop tests (test_routing.py): the routing config file, the routing
CLI, readers of twinhub's Event Hub-compatible streams, a webhook receiver, and /metrics.

Everything talks to the hub through its public surface: `twinhub serve --config FILE` with
`[[endpoints]]`, `[[routes]]`, `[[enrichments]]` and `[fallback]`; the `twinhub endpoint|route|
enrichment` commands; `twinhub connection-string --events [--entity NAME]`; the REST API; the
Event Hub-compatible endpoint read with azure-eventhub 5.15.1 (unchanged, trust given with its
own `connection_verify` keyword); and plain HTTP to a webhook server run by the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Sequence

import requests

from harness import CLI_TIMEOUT_S, Hub, HubError, _hub_process_env

RECEIVE_TIMEOUT_S = 30.0

# --------------------------------------------------------------------------------------------
# The config file
# --------------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string for what we write
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def routing_toml(
    *,
    endpoints: Sequence[dict[str, Any]] = (),
    routes: Sequence[dict[str, Any]] = (),
    enrichments: Sequence[dict[str, Any]] = (),
    fallback: bool | None = None,
    settings: dict[str, Any] | None = None,
) -> str:
    """The text of a `serve --config` file with these routing tables (and plain settings)."""
    lines: list[str] = []
    for k, v in (settings or {}).items():
        lines.append(f"{k} = {_toml_value(v)}")
    for table, items in (("endpoints", endpoints), ("routes", routes), ("enrichments", enrichments)):
        for item in items:
            lines.append("")
            lines.append(f"[[{table}]]")
            for k, v in item.items():
                lines.append(f"{k} = {_toml_value(v)}")
    if fallback is not None:
        lines += ["", "[fallback]", f"enabled = {_toml_value(fallback)}"]
    return "\n".join(lines) + "\n"


def write_config(path: Path, **tables: Any) -> Path:
    path.write_text(routing_toml(**tables))
    return path


def stream(name: str) -> dict[str, Any]:
    return {"name": name, "kind": "stream"}


def webhook(name: str, url: str) -> dict[str, Any]:
    return {"name": name, "kind": "webhook", "url": url}


def route(
    name: str, condition: str, endpoints: list[str], source: str = "DeviceMessages", enabled: bool = True
) -> dict[str, Any]:
    return {
        "name": name,
        "source": source,
        "condition": condition,
        "endpoints": endpoints,
        "enabled": enabled,
    }


# --------------------------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------------------------


def cli_run(hub: Hub, *args: str) -> subprocess.CompletedProcess:
    """`twinhub <args> --data-dir <hub's>`, whatever its exit code (for refusals); run as
    Hub.cli runs it (same environment and directory), which raises on a non-zero exit."""
    cmd = [str(hub.binary), *args, "--data-dir", str(hub.data_dir)]
    try:
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CLI_TIMEOUT_S,
            env=_hub_process_env(),
            cwd=str(hub.workdir),
            text=True,
        )
    except subprocess.TimeoutExpired as e:
        raise HubError(f"`twinhub {' '.join(args)}` timed out after {CLI_TIMEOUT_S}s") from e


def cli_ok(hub: Hub, *args: str) -> str:
    """`twinhub <args> --data-dir <hub's>`; fails with its output unless it exits 0."""
    __tracebackhide__ = True
    res = cli_run(hub, *args)
    if res.returncode != 0:
        raise HubError(
            f"`twinhub {' '.join(args)}` exited {res.returncode}\n"
            f"stdout: {res.stdout}\nstderr: {res.stderr}"
        )
    return res.stdout


def events_cs(hub: Hub, entity: str | None = None) -> str:
    """What `twinhub connection-string --events [--entity NAME]` prints: the Event
    Hub-compatible connection string of `events`, or of the stream endpoint `entity`."""
    args = ["connection-string", "--events"]
    if entity is not None:
        args += ["--entity", entity]
    out = cli_ok(hub, *args).strip()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, f"connection-string printed {len(lines)} lines: {out!r}"
    return lines[0].strip()


_BUILTIN_CS: dict[str, str] = {}


def stream_cs(hub: Hub, entity: str | None = None) -> str:
    """The connection string readers use: the built-in endpoint's (from the CLI, once per hub)
    with `EntityPath=<endpoint name>` for a stream endpoint, as the issue defines streams.
    (test_routing checks that `--entity` prints the same.)"""
    key = str(hub.data_dir)
    if key not in _BUILTIN_CS:
        _BUILTIN_CS[key] = events_cs(hub)
    cs = _BUILTIN_CS[key]
    if entity is None:
        return cs
    head, sep, _ = cs.partition(";EntityPath=")
    assert sep, f"no EntityPath in {cs!r}"
    return f"{head};EntityPath={entity}"


# --------------------------------------------------------------------------------------------
# Reading streams with azure-eventhub
# --------------------------------------------------------------------------------------------


def text(v: Any) -> Any:
    """An AMQP string as pyamqp hands it over (bytes or str) as str; other values unchanged."""
    return v.decode() if isinstance(v, (bytes, bytearray)) else v


def props(event: Any) -> dict[str, Any]:
    """An event's application properties with str keys and values."""
    return {text(k): text(v) for k, v in (event.properties or {}).items()}


def sysprops(event: Any) -> dict[str, Any]:
    """An event's system properties (AMQP properties and annotations) with str keys."""
    return {text(k): v for k, v in (event.system_properties or {}).items()}


def device_of(event: Any) -> str | None:
    return text(sysprops(event).get("iothub-connection-device-id"))


def of_device(events: list, device_id: str) -> list:
    return [e for e in events if device_of(e) == device_id]


def tag_of(event: Any) -> str | None:
    """The `tag` application property the tests put on every message they send."""
    return props(event).get("tag")


class StreamReader:
    """One EventHubConsumerClient.receive_batch running in a thread from the start of a stream,
    keeping every event; waits on it are bounded.

    The reader is started once and read many times, because a consumer client takes a second or
    more to connect: tests send, then wait for what they expect.
    """

    def __init__(self, hub: Hub, entity: str | None = None, cs: str | None = None, **kwargs: Any) -> None:
        from azure.eventhub import EventHubConsumerClient

        self.hub = hub
        self.entity = entity or "events"
        self.cs = cs or stream_cs(hub, entity)
        kwargs.setdefault("connection_verify", str(hub.ca_pem))
        self.client = EventHubConsumerClient.from_connection_string(
            self.cs, consumer_group=kwargs.pop("consumer_group", "$Default"), **kwargs
        )
        self.events: list = []
        # The highest sequence number read per partition id.
        self.top: dict[str, int] = {}
        self.errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._closed = False

        def on_batch(partition_context, batch):
            with self._cond:
                self.events.extend(batch)
                pid = partition_context.partition_id
                for e in batch:
                    self.top[pid] = max(self.top.get(pid, -1), e.sequence_number)
                self._cond.notify_all()

        def on_error(partition_context, error):
            with self._cond:
                self.errors.append(error)
                self._cond.notify_all()

        self._thread = threading.Thread(
            target=self.client.receive_batch,
            kwargs={
                "on_event_batch": on_batch,
                "on_error": on_error,
                "starting_position": "-1",
                "max_batch_size": 300,
                "max_wait_time": 0.5,
            },
            name=f"reader-{self.entity}",
            daemon=True,
        )
        self._thread.start()

    def snapshot(self) -> list:
        with self._cond:
            return list(self.events)

    def wait_for(
        self, want: Callable[[list], Any], timeout: float = RECEIVE_TIMEOUT_S, what: str = ""
    ) -> list:
        """Waits until want(events) is truthy; fails with what was read when the time is up."""
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._cond:
            while not want(self.events):
                remaining = deadline - time.monotonic()
                fatal = [e for e in self.errors if _not_found(e)]
                if fatal:
                    path = self.cs.split(";")[-1]
                    raise AssertionError(
                        f"stream {self.entity}: the hub does not know it ({path}): {fatal[0]!r}"
                    )
                if remaining <= 0:
                    seen = [(device_of(e), tag_of(e), e.body_as_str()[:80]) for e in self.events[-30:]]
                    raise AssertionError(
                        f"stream {self.entity}: timed out after {timeout}s waiting for {what or want}; "
                        f"read {len(self.events)} events (last: {seen}); reader errors: {self.errors!r}"
                    )
                self._cond.wait(min(remaining, 0.5))
            return list(self.events)

    def wait_tags(self, device_id: str, tags: set[str], timeout: float = RECEIVE_TIMEOUT_S) -> list:
        """Waits until the device's events hold every tag in `tags`; returns the device's events."""
        __tracebackhide__ = True
        self.wait_for(
            lambda evs: tags <= {tag_of(e) for e in of_device(evs, device_id)},
            timeout,
            what=f"tags {sorted(tags)} of {device_id}",
        )
        return of_device(self.snapshot(), device_id)

    def to_end(self, timeout: float = RECEIVE_TIMEOUT_S) -> list:
        """Every event the stream holds now: waits until each partition's last enqueued
        sequence number, as the hub reports it at this call, has been read."""
        __tracebackhide__ = True
        last = last_sequences(self.hub, self.cs)

        def at_end(evs: list) -> bool:
            return all(self.top.get(pid, -1) >= seq for pid, seq in last.items())

        return self.wait_for(at_end, timeout, what=f"the end of {self.entity} {last}")

    def close(self, wait: bool = True) -> None:
        """Closes the client; without `wait`, in the background (it takes a second)."""
        if self._closed:
            return
        self._closed = True
        if not wait:
            threading.Thread(target=self.client.close, name=f"close-{self.entity}", daemon=True).start()
            return
        self.client.close()
        self._thread.join(15)
        assert not self._thread.is_alive(), "receive_batch did not return after close()"


def _not_found(error: BaseException) -> bool:
    """An error the SDK would retry forever, though the entity does not exist."""
    t = str(error)
    return "NotFound" in t or "Status code: 404" in t or "amqp:not-found" in t


def last_sequences(hub: Hub, cs: str) -> dict[str, int]:
    """Each non-empty partition's last enqueued sequence number, from `$management` READs
    (get_partition_properties, one client per partition side by side: each call opens its
    own connection, which takes a while)."""
    from azure.eventhub import EventHubConsumerClient

    def client():
        return EventHubConsumerClient.from_connection_string(
            cs, consumer_group="$Default", connection_verify=str(hub.ca_pem)
        )

    first = client()
    try:
        ids = first.get_partition_ids()
    finally:
        first.close()

    def one(pid: str) -> tuple[str, dict[str, Any]]:
        c = client()
        try:
            return pid, c.get_partition_properties(pid)
        finally:
            c.close()

    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        found = list(pool.map(one, ids))
    return {pid: p["last_enqueued_sequence_number"] for pid, p in found if not p["is_empty"]}


def read_to_end(hub: Hub, entity: str | None = None, timeout: float = RECEIVE_TIMEOUT_S) -> list:
    """Every event a stream holds right now: reads until each partition's last enqueued
    sequence number (from get_partition_properties) has been seen. Messages a device sent
    are there once send_message returned: the hub acknowledges after every append is durable."""
    __tracebackhide__ = True
    cs = stream_cs(hub, entity)
    reader = StreamReader(hub, entity, cs=cs)
    try:
        return reader.to_end(timeout)
    finally:
        reader.close(wait=False)


# --------------------------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------------------------


def message(
    tag: str,
    body: Any,
    *,
    json_body: bool = True,
    **properties: str,
):
    """An azure-iot-device Message: a JSON body (content_type application/json, utf-8) or a
    text one, with application property `tag` and `properties`."""
    from azure.iot.device import Message

    m = Message(json.dumps(body) if not isinstance(body, str) else body)
    m.message_id = str(uuid.uuid4())
    if json_body:
        m.content_type = "application/json"
        m.content_encoding = "utf-8"
    else:
        m.content_type = "text/plain"
        m.content_encoding = "utf-8"
    m.custom_properties["tag"] = tag
    for k, v in properties.items():
        m.custom_properties[k] = v
    return m


# --------------------------------------------------------------------------------------------
# /metrics
# --------------------------------------------------------------------------------------------


def metrics_text(hub: Hub) -> str:
    r = requests.get(f"{hub.base_url}/metrics", verify=str(hub.ca_bundle), timeout=10)
    assert r.status_code == 200, f"GET /metrics -> {r.status_code} {r.text[:300]!r}"
    return r.text


def metric(text_: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus series' samples whose labels include `labels` (0 when absent)."""
    total = 0.0
    pat = re.compile(rf"^{re.escape(name)}(\{{(?P<labels>[^}}]*)\}})?\s+(?P<value>\S+)$")
    for line in text_.splitlines():
        m = pat.match(line.strip())
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m["value"])
    return total


# --------------------------------------------------------------------------------------------
# A webhook receiver
# --------------------------------------------------------------------------------------------


class WebhookServer:
    """An HTTP server (http.server, in a thread) on a free port of a loopback address that
    records every request and answers with the status `policy(request)` returns (200 unless
    told otherwise)."""

    def __init__(self, host: str = "127.0.0.1", path: str = "/hook") -> None:
        self.requests: list[dict[str, Any]] = []
        self.policy: Callable[[dict[str, Any]], int] = lambda req: 200
        self._cond = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _serve(self) -> None:
                body = self._body()
                req = {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                    "time": time.monotonic(),
                }
                try:
                    status = int(server.policy(req))
                except Exception:  # noqa: BLE001 - a policy bug answers 599, visibly
                    status = 599
                req["status"] = status
                with server._cond:
                    server.requests.append(req)
                    server._cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = _serve  # noqa: N815 - http.server's names
            do_PUT = _serve  # noqa: N815
            do_GET = _serve  # noqa: N815

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)
        self._thread.start()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.requests)

    def accepted(self) -> list[dict[str, Any]]:
        return [r for r in self.snapshot() if 200 <= r["status"] < 300]

    def wait_for(self, want: Callable[[list], Any], timeout: float, what: str = "") -> list:
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._cond:
            while not want(self.requests):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [
                        (r["status"], r["headers"].get("ce-tag"), r["body"][:60]) for r in self.requests[-20:]
                    ]
                    raise AssertionError(
                        f"webhook: timed out after {timeout}s waiting for {what or want}; "
                        f"{len(self.requests)} requests (last: {seen})"
                    )
                self._cond.wait(min(remaining, 0.5))
            return list(self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
