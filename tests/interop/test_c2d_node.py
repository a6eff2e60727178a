"""Cloud-to-device messages with the official Node.js SDKs, unchanged.

Back end: azure-iothub 1.16.6's `Client.fromConnectionString(cs, Amqp | AmqpWs)`: `send` (with
`message.ack = 'full'`) and `getFeedbackReceiver()` (node/c2d_service.mjs), over AMQP/TLS on
5671 and AMQP over WebSockets on 443 (`/$iothub/websocket`, no SASL). Devices: the official
Python device SDK over MQTT, and the Node device SDK's HTTPS transport (azure-iot-device with
azure-iot-device-http, node/http_device.mjs): receive, complete, reject, abandon past the
delivery count, and `sendEvent` into the event log. The hub's CA is trusted with
NODE_EXTRA_CA_CERTS only (node_runner).

Every hub here sends feedback every FEEDBACK_INTERVAL_MS instead of IoT Hub's 15 s. The tests
that read feedback over AMQP get a hub of their own: the feedback queue is hub-wide, and the
receiver completes whatever it is handed.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import requests

from c2dlib import FAST_FEEDBACK, FeedbackLog, close_registry, connect_receiver, expiry_ms, registry, send_c2d
from harness import Hub, device_sas, unique_id
from node_runner import NodeRun, run_node

pytestmark = pytest.mark.device

PROCESS_TIMEOUT_S = 90.0
FEEDBACK_CONTENT_TYPE = "application/vnd.microsoft.iothub.feedback.json"


@pytest.fixture
def c2d_hub(hub_factory) -> Hub:
    return hub_factory(extra_args=FAST_FEEDBACK)


def c2d_service(
    hub: Hub,
    messages: list[dict],
    *,
    feedback_for: list[str] = (),
    websockets: bool = False,
    timeout: int = 30,
    cs: str | None = None,
) -> NodeRun:
    args = [cs or hub.service_cs("service"), "--send", json.dumps(messages), "--timeout", str(timeout)]
    for m in feedback_for:
        args += ["--feedback-for", m]
    if websockets:
        args.append("--websockets")
    return run_node("c2d_service.mjs", hub, *args, timeout=PROCESS_TIMEOUT_S)


# The device client never hands its HTTP transport's errors to the application (InternalClient
# only logs them through `debug`): these namespaces put them on stderr for run.explain().
HTTP_DEBUG = {"DEBUG": "azure-iot-device:InternalClient:Errors,azure-iot-device-http:Http:Errors"}


def http_device(hub: Hub, device_id: str, *args: str) -> NodeRun:
    return run_node(
        "http_device.mjs", hub, hub.device_cs(device_id), *args, timeout=PROCESS_TIMEOUT_S, env=HTTP_DEBUG
    )


def transport_errors(run: NodeRun) -> list[str]:
    return [line for line in run.stderr.splitlines() if "Transport error" in line or ":Errors" in line]


def explain_http(run: NodeRun, hub: Hub, device_id: str) -> str:
    """run.explain(), plus the hub's answer to the receive the SDK polls with (the SDK logs only
    the status text): GET /devices/{id}/messages/devicebound with the device's SAS token."""
    errs = transport_errors(run)
    lines = [f"{len(errs)} transport errors; first: {errs[:1]}"]
    token = device_sas(hub.hostname, device_id, hub.device_key(device_id), int(time.time()) + 600)
    r = requests.get(
        f"{hub.base_url}/devices/{device_id}/messages/devicebound",
        params={"api-version": "2021-04-12"},
        headers={"Authorization": token, "iothub-to": f"/devices/{device_id}/messages/devicebound"},
        verify=str(hub.ca_pem),
        timeout=10,
    )
    lines.append(f"the same GET by hand: {r.status_code} {dict(r.headers)} {r.text[:300]!r}")
    return "\n".join(lines) + "\n" + run.explain()


def feedback_records(run: NodeRun) -> dict[str, dict]:
    """Every record the Node feedback receiver got, by original message id (each seen once)."""
    __tracebackhide__ = True
    out: dict[str, dict] = {}
    for fb in run.of_type("feedback"):
        assert fb["contentType"] == FEEDBACK_CONTENT_TYPE, fb
        assert fb["parseError"] is None and isinstance(fb["records"], list) and fb["records"], fb
        for r in fb["records"]:
            assert r["originalMessageId"] not in out, f"record delivered twice: {r}"
            out[r["originalMessageId"]] = r
    return out


@pytest.mark.parametrize("transport", ["amqps", "websockets"])
def test_node_send_with_full_ack_gives_success_feedback(c2d_hub, device_client, transport):
    hub = c2d_hub
    device_id = unique_id("nc2d")
    client, inbox = connect_receiver(device_client, hub, device_id)
    uuid_id = str(uuid.uuid4())  # the SDK sends a UUID-shaped id as an AMQP uuid
    text_id = f"node-{uuid.uuid4().hex[:8]}"  # and any other id as a string
    messages = [
        {
            "device": device_id,
            "body": "turn on the fan",
            "messageId": uuid_id,
            "correlationId": "node-corr",
            "contentType": "text/plain",
            "contentEncoding": "utf-8",
            "ack": "full",
            "properties": {"level": "3", "a b/c": "x&y=z"},
        },
        {"device": device_id, "body": "second", "messageId": text_id, "ack": "full"},
    ]
    run = c2d_service(hub, messages, feedback_for=[uuid_id, text_id], websockets=(transport == "websockets"))
    assert run.returncode == 0, run.explain()
    assert [s["messageId"] for s in run.of_type("sent")] == [uuid_id, text_id], run.explain()
    assert not run.errors and not run.of_type("send-error"), run.explain()

    first, second = inbox.wait_for(2)
    assert first.data == b"turn on the fan" and second.data == b"second"
    assert first.message_id == uuid_id and second.message_id == text_id
    assert first.correlation_id == "node-corr"
    assert first.content_type == "text/plain" and first.content_encoding == "utf-8"
    assert first.custom_properties == {"level": "3", "a b/c": "x&y=z"}
    assert first.ack == "full" and second.ack == "full"

    recs = feedback_records(run)
    generation = hub.registry().get_device(device_id).generation_id
    for m in (uuid_id, text_id):
        r = recs.get(m)
        assert r is not None, f"no feedback record for {m}: {run.explain()}"
        assert r["statusCode"] == "Success" and r["description"] == "Success", r
        assert r["deviceId"] == device_id and r["deviceGenerationId"] == generation, r


def test_node_expired_message_gives_expired_feedback_and_is_never_delivered(c2d_hub, device_client):
    """`message.expiryTimeUtc` a moment ahead, the device offline until after it: never
    delivered, `Expired` feedback (the hub sweeps every second)."""
    hub = c2d_hub
    device_id = unique_id("nttl")
    hub.device_cs(device_id)
    doomed = str(uuid.uuid4())
    run = c2d_service(
        hub,
        [
            {
                "device": device_id,
                "body": "too late",
                "messageId": doomed,
                "ack": "full",
                "expiryTimeUtc": expiry_ms(1.5),
            }
        ],
        feedback_for=[doomed],
    )
    assert run.returncode == 0, run.explain()
    r = feedback_records(run).get(doomed)
    assert r is not None and r["statusCode"] == "Expired", run.explain()
    assert r["deviceId"] == device_id
    client, inbox = connect_receiver(device_client, hub, device_id)
    assert inbox.quiet(0, 2.0) == [], "the expired message was delivered"


def test_node_send_refusals_have_the_sdk_error_classes(c2d_hub):
    hub = c2d_hub
    offline = unique_id("nfull")
    hub.device_cs(offline)
    nosuch = unique_id("nosuch")
    messages = [{"device": nosuch, "body": "nobody home", "messageId": "to-nobody"}]
    messages += [{"device": offline, "body": "x" * (64 * 1024 + 1), "messageId": "too-big"}]
    messages += [{"device": offline, "body": f"fill {i}", "messageId": f"fill-{i}"} for i in range(51)]
    run = c2d_service(hub, messages, timeout=60)
    assert run.returncode == 0, run.explain()
    errors = {e["messageId"]: e for e in run.of_type("send-error")}
    assert set(errors) == {"to-nobody", "too-big", "fill-50"}, run.explain()
    assert len(run.of_type("sent")) == 50

    e = errors["to-nobody"]
    assert e["name"] == "DeviceNotFoundError", e
    assert e["message"] == "AMQP Transport: Could not send message", e
    assert e["amqpCondition"] == "amqp:not-found", e
    e = errors["too-big"]
    assert e["name"] == "MessageTooLargeError", e
    assert e["amqpCondition"] == "amqp:link:message-size-exceeded", e
    e = errors["fill-50"]
    assert e["name"] == "DeviceMaximumQueueDepthExceededError", e
    assert e["amqpCondition"] == "amqp:resource-limit-exceeded", e
    assert hub.registry().get_device(offline).cloud_to_device_message_count == 50


def test_node_sender_without_service_connect_is_refused(c2d_hub, device_client):
    hub = c2d_hub
    device_id = unique_id("nauth")
    client, inbox = connect_receiver(device_client, hub, device_id)
    run = c2d_service(
        hub,
        [{"device": device_id, "body": "not allowed", "messageId": "nope"}],
        cs=hub.service_cs("registryRead"),
    )
    refused = run.of_type("send-error") + run.of_type("fatal")
    assert refused and not run.of_type("sent"), run.explain()
    assert refused[0]["name"] == "UnauthorizedError", run.explain()
    assert inbox.quiet(0, 1.5) == []


# ---- the device's HTTPS transport ----------------------------------------------------------


def test_http_device_receives_completes_rejects_and_abandons(c2d_hub):
    """One message completed (Success), one rejected (Rejected), one abandoned every time it
    comes: delivered maxDeliveryCount (10) times, then DeliveryCountExceeded."""
    hub = c2d_hub
    device_id = unique_id("nhttp")
    hub.device_cs(device_id)
    rm = registry(hub)
    ids = {a: f"{a}-{uuid.uuid4().hex[:8]}" for a in ("complete", "reject", "abandon")}
    expiry = expiry_ms(3600)
    try:
        for action, m in ids.items():
            send_c2d(
                rm,
                device_id,
                f"please {action}",
                {
                    "messageId": m,
                    "correlationId": f"corr-{action}",
                    "iothub-ack": "full",
                    "expiryTimeUtc": expiry,
                    "action": action,
                    "colour": "dark blue",
                },
            )
    finally:
        close_registry(rm)
    feedback = FeedbackLog(hub)

    run = http_device(
        hub, device_id, "--receive", "12", "--quiet", "2", "--interval", "0.2", "--timeout", "30"
    )
    assert not transport_errors(run), explain_http(run, hub, device_id)
    assert run.returncode == 0, run.explain()
    assert not run.errors, run.explain()
    got = run.of_type("message")
    by_id: dict[str, list[dict]] = {}
    for g in got:
        by_id.setdefault(g["messageId"], []).append(g)
    assert {k: len(v) for k, v in by_id.items()} == {
        ids["complete"]: 1,
        ids["reject"]: 1,
        ids["abandon"]: 10,
    }, run.explain()
    for action, m in ids.items():
        first = by_id[m][0]
        assert first["data"] == f"please {action}"
        assert first["correlationId"] == f"corr-{action}"
        # MQTT spells it deviceBound (captures in messaging-protocol B5); over HTTPS unknown.
        assert first["to"].lower() == f"/devices/{device_id}/messages/devicebound".lower(), first
        # This transport hands application properties over under their header names.
        assert first["properties"] == {"iothub-app-action": action, "iothub-app-colour": "dark blue"}, first
        assert first["expiryTimeUtc"], first
        assert first["lockToken"], first
    # A fresh lock for every delivery.
    assert len({g["lockToken"] for g in by_id[ids["abandon"]]}) == 10
    settled = run.of_type("settled")
    assert all(s["ok"] for s in settled), run.explain()
    assert sorted(s["action"] for s in settled) == ["abandon"] * 10 + ["complete", "reject"]

    recs = feedback.wait_for(list(ids.values()))
    assert recs[ids["complete"]]["statusCode"] == "Success"
    assert recs[ids["reject"]]["statusCode"] == "Rejected"
    assert recs[ids["abandon"]]["statusCode"] == "DeliveryCountExceeded"
    assert hub.registry().get_device(device_id).cloud_to_device_message_count == 0


def test_http_device_polls_an_empty_queue_without_errors(c2d_hub):
    hub = c2d_hub
    device_id = unique_id("nhttp0")
    hub.device_cs(device_id)
    run = http_device(hub, device_id, "--receive", "1", "--timeout", "3")
    assert not transport_errors(run), explain_http(run, hub, device_id)  # 204 is no error
    assert run.returncode == 2 and not run.of_type("message"), run.explain()
    assert not run.errors, run.explain()


def test_http_device_send_event_arrives_in_the_event_log(c2d_hub):
    from test_telemetry import collect, consumer, of_device

    hub = c2d_hub
    device_id = unique_id("nhttpev")
    specs = [
        {
            "body": json.dumps({"temperature": 21.5, "i": i}),
            "messageId": f"ev-{i}-{uuid.uuid4().hex[:6]}",
            "correlationId": f"corr-{i}",
            "contentType": "application/json",
            "contentEncoding": "utf-8",
            "properties": {"temperatureAlert": "true" if i else "false", "source": "http"},
        }
        for i in range(2)
    ]
    args = []
    for s in specs:
        args += ["--send-event", json.dumps(s)]
    run = http_device(hub, device_id, *args)
    assert run.returncode == 0, run.explain()
    assert [s["statusCode"] for s in run.of_type("sent")] == [204, 204], run.explain()

    events = of_device(collect(consumer(hub), lambda evs: len(of_device(evs, device_id)) >= 2), device_id)
    assert len(events) == 2, f"read {len(events)} of 2 events"
    for ev, s in zip(events, specs, strict=True):
        assert json.loads(ev.body_as_str()) == json.loads(s["body"])
        # HTTP header names are case-insensitive and hyper hands them over lower-cased, so
        # application property names sent over HTTPS arrive in lower case (a documented
        # deviation; MQTT and AMQP keep the case).
        assert ev.properties == {
            b"temperaturealert": s["properties"]["temperatureAlert"].encode(),
            b"source": b"http",
        }, ev.properties
        sp = ev.system_properties
        assert sp[b"message-id"] in (s["messageId"], s["messageId"].encode()), sp
        assert sp[b"correlation-id"] in (s["correlationId"], s["correlationId"].encode()), sp
        assert sp[b"content-type"] in (b"application/json", "application/json"), sp
        assert sp[b"content-encoding"] in (b"utf-8", "utf-8"), sp
        assert sp[b"iothub-connection-device-id"] == device_id.encode()
        assert sp[b"iothub-message-source"] == b"Telemetry"
        assert b"iothub-enqueuedtime" in sp
