"""Shared by the cloud-to-device interop tests (test_c2d*.py): the hub flags, a bounded
`send_c2d_message`, a device inbox, and a reader of the HTTPS feedback calls.

Everything talks to the hub through the official SDKs, unchanged: azure-iot-hub 2.7.0's
`IoTHubRegistryManager.send_c2d_message` (uamqp; it trusts the bundle SSL_CERT_FILE names, which
conftest points at the hub of the test), azure-iot-device 2.14.0's `on_message_received`, and
`IoTHubHttpRuntimeManager`'s feedback calls. Those calls return None (the SDK never deserializes
the feedback body), so a requests response hook on the SDK's own pipeline keeps the response the
SDK received: its body (the JSON array of records) and its ETag (the lock token).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

from harness import Hub

# IoT Hub sends a feedback message at most every 15 s unless 64 records wait; the tests ask
# the hub for a short interval so they need not wait that long.
FEEDBACK_INTERVAL_MS = 300
FAST_FEEDBACK = ("--c2d-feedback-interval-ms", str(FEEDBACK_INTERVAL_MS))

SEND_TIMEOUT_S = 30.0
RECEIVE_TIMEOUT_S = 20.0
FEEDBACK_TIMEOUT_S = 20.0

FEEDBACK_CONTENT_TYPE = "application/vnd.microsoft.iothub.feedback.json"
FEEDBACK_FIELDS = {
    "originalMessageId",
    "enqueuedTimeUtc",
    "statusCode",
    "description",
    "deviceId",
    "deviceGenerationId",
}
FEEDBACK_STATUSES = {"Success", "Expired", "DeliveryCountExceeded", "Rejected", "Purged"}


class SendTimeout(AssertionError):
    """send_c2d_message did not return in time (uamqp has no timeout of its own)."""


def registry(hub: Hub, *, websockets: bool = False, policy: str = "iothubowner", cs: str | None = None):
    """An IoTHubRegistryManager whose C2D sends go over AMQP/TLS on 5671 or AMQP over
    WebSockets on 443 (`transport_type=uamqp.TransportType.AmqpOverWebsocket`)."""
    import uamqp

    transport = uamqp.TransportType.AmqpOverWebsocket if websockets else uamqp.TransportType.Amqp
    return hub.registry(policy, cs=cs, transport_type=transport)


def send_c2d(
    rm: Any,
    device_id: str,
    data: Any,
    properties: dict[str, Any] | None = None,
    *,
    timeout: float = SEND_TIMEOUT_S,
) -> None:
    """rm.send_c2d_message(...) bounded in time; re-raises what the SDK raised.

    uamqp's SendClient waits for the disposition without a timeout (msg_timeout=0), so a hub
    that never settles the transfer would hang the test; the call runs in a thread instead.
    """
    __tracebackhide__ = True
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            rm.send_c2d_message(device_id, data, properties=dict(properties or {}))
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = e

    t = threading.Thread(target=run, name=f"c2d-send-{device_id}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise SendTimeout(
            f"send_c2d_message({device_id!r}) did not return within {timeout}s "
            "(no disposition for the transfer?)"
        )
    if "error" in outcome:
        raise outcome["error"]


def close_registry(rm: Any, timeout: float = 10.0) -> None:
    """Closes the registry manager's uamqp client, bounded."""
    client = getattr(rm, "amqp_svc_client", None)
    if client is None:
        return
    t = threading.Thread(target=client.disconnect_sync, daemon=True)
    t.start()
    t.join(timeout)


def expiry_ms(seconds_from_now: float) -> int:
    """An absolute expiry as `properties={"expiryTimeUtc": ...}` takes it (ms since the epoch)."""
    return int((time.time() + seconds_from_now) * 1000)


def parse_time(text: str) -> dt.datetime:
    """An IoT Hub time string (RFC 3339, any fraction length, Z) as an aware datetime."""
    t = text.strip()
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    if "." in t:
        head, rest = t.split(".", 1)
        frac = ""
        while rest and rest[0].isdigit():
            frac, rest = frac + rest[0], rest[1:]
        t = f"{head}.{(frac + '000000')[:6]}{rest}"
    return dt.datetime.fromisoformat(t)


class Inbox:
    """An `on_message_received` handler that keeps every message, with waits that are bounded."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._cond = threading.Condition()

    def __call__(self, message: Any) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = RECEIVE_TIMEOUT_S) -> list[Any]:
        """The first n messages; fails when fewer arrived within the timeout."""
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = [(m.message_id, m.data[:60]) for m in self.messages]
                    raise AssertionError(
                        f"received {len(self.messages)} of {n} messages within {timeout}s: {got}"
                    )
                self._cond.wait(remaining)
            return list(self.messages[:n])

    def quiet(self, n: int, duration: float) -> list[Any]:
        """Waits `duration` and returns everything beyond the first n messages (should be [])."""
        time.sleep(duration)
        with self._cond:
            return list(self.messages[n:])


def connect_receiver(device_client, hub: Hub, device_id: str, **kwargs: Any) -> tuple[Any, Inbox]:
    """An official IoTHubDeviceClient, connected, with `on_message_received` set (the SDK
    subscribes to devices/{id}/messages/devicebound/# before the setter returns)."""
    client = device_client(hub.device_cs(device_id), **kwargs)
    client.connect()
    inbox = Inbox()
    client.on_message_received = inbox
    return client, inbox


# --------------------------------------------------------------------------------------------
# Feedback over HTTPS (IoTHubHttpRuntimeManager)
# --------------------------------------------------------------------------------------------


class ResponseCapture:
    """A requests hook on the SDK's pipeline: keeps each response the SDK got, body included."""

    def __init__(self) -> None:
        self.responses: list[requests.Response] = []

    def __call__(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        _ = response.content  # read now: the body is what the test needs
        self.responses.append(response)

    @property
    def last(self) -> requests.Response:
        assert self.responses, "the SDK made no HTTP call"
        return self.responses[-1]


@dataclass
class FeedbackBatch:
    lock_token: str
    records: list[dict[str, Any]]
    response: requests.Response


def describe(resp: requests.Response) -> str:
    return (
        f"{resp.request.method} {resp.url} -> {resp.status_code} "
        f"headers={dict(resp.headers)} body={resp.text[:800]!r}"
    )


@dataclass
class FeedbackLog:
    """Every feedback record the hub hands out over HTTPS, read with IoTHubHttpRuntimeManager.

    The feedback queue is hub-wide: a batch may hold records of messages other tests sent. So
    every batch read is completed and all its records kept, and a test waits for the records of
    its own message ids.
    """

    hub: Hub
    records: list[dict[str, Any]] = field(default_factory=list)
    batches: list[FeedbackBatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        from azure.iot.hub import IoTHubHttpRuntimeManager

        self.hrm = IoTHubHttpRuntimeManager.from_connection_string(self.hub.service_cs())
        self.hrm.protocol.config.connection.verify = str(self.hub.ca_bundle)
        self.capture = ResponseCapture()
        self.hrm.protocol.config.hooks.append(self.capture)

    def receive(self) -> FeedbackBatch | None:
        """One `receive_feedback_notification()`: the batch it locked, or None on 204."""
        __tracebackhide__ = True
        ret = self.hrm.receive_feedback_notification()
        assert ret is None, f"receive_feedback_notification returned {ret!r}"
        resp = self.capture.last
        assert resp.request.method == "GET" and "/messages/serviceBound/feedback" in resp.url, describe(resp)
        if resp.status_code == 204:
            assert not resp.content, f"204 with a body: {describe(resp)}"
            return None
        assert resp.status_code == 200, describe(resp)
        ctype = resp.headers.get("Content-Type", "")
        assert ctype.split(";")[0].strip() == FEEDBACK_CONTENT_TYPE, (
            f"content type {ctype!r}: {describe(resp)}"
        )
        etag = resp.headers.get("ETag")
        assert etag, f"no ETag (lock token) on the feedback response: {describe(resp)}"
        lock = etag.strip().strip('"')
        assert lock, describe(resp)
        records = json.loads(resp.content)
        assert isinstance(records, list) and records, (
            f"feedback body is not a non-empty array: {describe(resp)}"
        )
        for r in records:
            check_record(r)
        batch = FeedbackBatch(lock, records, resp)
        self.batches.append(batch)
        return batch

    def complete(self, batch: FeedbackBatch) -> None:
        __tracebackhide__ = True
        assert self.hrm.complete_feedback_notification(batch.lock_token) is None
        resp = self.capture.last
        assert resp.request.method == "DELETE" and resp.status_code == 204, describe(resp)
        self.records.extend(batch.records)

    def abandon(self, batch: FeedbackBatch) -> None:
        __tracebackhide__ = True
        assert self.hrm.abandon_feedback_notification(batch.lock_token) is None
        resp = self.capture.last
        assert resp.request.method == "POST" and resp.status_code == 204, describe(resp)

    def drain(self) -> int:
        """Reads and completes every batch waiting now; returns how many records it read."""
        n = 0
        while (batch := self.receive()) is not None:
            self.complete(batch)
            n += len(batch.records)
        return n

    def of(self, message_id: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["originalMessageId"] == message_id]

    def wait_for(
        self, message_ids: list[str], timeout: float = FEEDBACK_TIMEOUT_S
    ) -> dict[str, dict[str, Any]]:
        """Polls until a record for each message id was read; returns them by message id."""
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        while True:
            found = {m: self.of(m) for m in message_ids}
            if all(found.values()):
                for m, recs in found.items():
                    assert len(recs) == 1, f"{len(recs)} feedback records for {m}: {recs}"
                return {m: recs[0] for m, recs in found.items()}
            if time.monotonic() >= deadline:
                missing = [m for m, recs in found.items() if not recs]
                raise AssertionError(
                    f"no feedback within {timeout}s for {missing}; records read: {self.records[-20:]}"
                )
            if self.drain() == 0:
                time.sleep(0.2)


def check_record(r: Any) -> None:
    """A feedback record as IoT Hub documents it (B4)."""
    __tracebackhide__ = True
    assert isinstance(r, dict), r
    assert set(r) >= FEEDBACK_FIELDS, f"record lacks {FEEDBACK_FIELDS - set(r)}: {r}"
    assert r["statusCode"] in FEEDBACK_STATUSES, r
    assert isinstance(r["originalMessageId"], str) and r["originalMessageId"], r
    assert isinstance(r["deviceId"], str) and r["deviceId"], r
    assert isinstance(r["description"], str) and r["description"], r
    parse_time(r["enqueuedTimeUtc"])
