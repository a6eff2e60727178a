"""Telemetry read back by the official Node.js Event Hubs SDK (@azure/event-hubs 6, unchanged):
azure-iot-device sends device-to-cloud messages over MQTT, and an EventHubConsumerClient
(node/read_events.mjs) reads them from the built-in Event Hub-compatible endpoint with the
connection string `twinhub connection-string --events` prints, over AMQP/TLS on 5671 or AMQP
over WebSockets on 443 (the `ws` package as the SDK's WebSocket). Also Azure's JS sample that
starts from the IoT Hub connection string and follows the messages/events redirect
(node/iothub_connection_string.mjs). The hub's CA is trusted with NODE_EXTRA_CA_CERTS only.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest

from harness import Hub, unique_id
from node_runner import NodeRun, run_node

pytestmark = pytest.mark.device

READ_TIMEOUT_S = 40
PROCESS_TIMEOUT_S = 90.0

# The tests that read get a hub of their own (fresh_hub): the consumer stops when it has read
# everything the hub holds, so no partition is still delivering when it closes. Closing in the
# middle of a delivery is a case of its own, not mixed into these.


def events_cs(hub: Hub) -> str:
    return hub.cli("connection-string", "--events", "--data-dir", str(hub.data_dir)).strip()


def send_interleaved(device_client, hub: Hub, device_ids: list[str], n: int) -> dict[str, list[dict]]:
    """Sends n messages from each device, alternating between devices; returns what each sent."""
    from azure.iot.device import Message

    clients = {d: device_client(hub.device_cs(d)) for d in device_ids}
    for c in clients.values():
        c.connect()
    sent: dict[str, list[dict]] = {d: [] for d in device_ids}
    for i in range(n):
        for d, c in clients.items():
            body = json.dumps({"device": d, "i": i, "reading": 20.5 + i})
            msg = Message(body)
            msg.message_id = str(uuid.uuid4())
            msg.content_type = "application/json"
            msg.content_encoding = "utf-8"
            msg.custom_properties["alert"] = "high" if i % 2 else "low"
            msg.custom_properties["origin"] = d
            c.send_message(msg)  # returns after the PUBACK, so the event is in the log
            sent[d].append({"body": body, "message_id": msg.message_id, "i": i})
    return sent


def assert_read_in_order(run: NodeRun, sent: dict[str, list[dict]]) -> None:
    __tracebackhide__ = True
    for device_id, want in sent.items():
        got = run.of_device(device_id)
        assert len(got) == len(want), f"{device_id}: read {len(got)} of {len(want)}\n{run.explain()}"
        assert len({e["partition"] for e in got}) == 1, f"{device_id}: spread over partitions {got}"
        for ev, w in zip(got, want, strict=True):
            assert ev["body"] == w["body"], f"{device_id} #{w['i']}: body {ev['body']!r}"
            assert ev["bodyType"] == "data"
            assert ev["properties"].get("alert") == ("high" if w["i"] % 2 else "low"), ev["properties"]
            assert ev["properties"].get("origin") == device_id, ev["properties"]
            sp = ev["systemProperties"]
            assert sp["iothub-connection-device-id"] == device_id
            assert sp.get("iothub-message-source") == "Telemetry", sp
            assert "iothub-enqueuedtime" in sp, sp
            assert "iothub-connection-auth-generation-id" in sp, sp
            assert ev["messageId"] == w["message_id"] and sp.get("messageId") == w["message_id"]
            assert ev["contentType"] == "application/json" and sp.get("contentType") == "application/json"
            assert sp.get("contentEncoding") == "utf-8", sp
            assert isinstance(ev["sequenceNumber"], int), ev
            assert isinstance(ev["offset"], str) and ev["offset"].isdigit(), ev
            assert ev["enqueuedTimeUtc"], ev
        seqs = [e["sequenceNumber"] for e in got]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"{device_id}: sequence numbers {seqs}"


@pytest.mark.parametrize("transport", ["amqps", "websockets"])
def test_node_consumer_reads_what_devices_sent(fresh_hub, device_client, transport):
    hub = fresh_hub
    devices = [unique_id("node"), unique_id("node")]
    sent = send_interleaved(device_client, hub, devices, 3)
    args = [events_cs(hub), "--count", "6", "--timeout", str(READ_TIMEOUT_S)]
    for d in devices:
        args += ["--device", d]
    if transport == "websockets":
        args.append("--websockets")
    run = run_node("read_events.mjs", hub, *args, timeout=PROCESS_TIMEOUT_S)
    assert run.returncode == 0, run.explain()
    assert not run.errors, run.explain()
    assert_read_in_order(run, sent)
    assert run.of_type("done") == [{"type": "done", "reason": "count", "counted": 6}], run.explain()


def test_node_client_metadata_agrees_with_what_is_read(fresh_hub, device_client):
    hub = fresh_hub
    device = unique_id("nodemeta")
    send_interleaved(device_client, hub, [device], 2)
    cs = events_cs(hub)
    props = run_node("hub_properties.mjs", hub, cs, timeout=PROCESS_TIMEOUT_S)
    assert props.returncode == 0 and not props.errors, props.explain()
    [info] = props.of_type("hub")
    assert info["name"] == cs.split("EntityPath=", 1)[1].split(";")[0]
    assert info["partitionIds"] == ["0", "1", "2", "3"]
    assert info["createdOn"] and not info["createdOn"].startswith("1970"), info
    partitions = {p["partitionId"]: p for p in props.of_type("partition")}
    assert sorted(partitions) == info["partitionIds"], props.explain()
    run = run_node(
        "read_events.mjs",
        hub,
        cs,
        "--count",
        "2",
        "--device",
        device,
        "--timeout",
        str(READ_TIMEOUT_S),
        timeout=PROCESS_TIMEOUT_S,
    )
    assert run.returncode == 0, run.explain()
    mine = run.of_device(device)
    p = partitions[mine[0]["partition"]]
    assert not p["isEmpty"] and p["eventHubName"] == info["name"], p
    assert p["beginningSequenceNumber"] <= mine[0]["sequenceNumber"], (p, mine[0])
    assert p["lastEnqueuedSequenceNumber"] >= mine[-1]["sequenceNumber"], (p, mine[-1])
    # Every event read from a partition lies within what its properties announce.
    for ev in run.events:
        q = partitions[ev["partition"]]
        first, last = q["beginningSequenceNumber"], q["lastEnqueuedSequenceNumber"]
        assert first <= ev["sequenceNumber"] <= last, (q, ev)


def test_node_client_is_refused_with_a_bad_key(hub):
    cs = events_cs(hub)
    key = re.search(r"SharedAccessKey=([^;]+)", cs)
    assert key, cs
    bad = cs.replace(key.group(1), "AAAA" + key.group(1)[4:])
    run = run_node("hub_properties.mjs", hub, bad, timeout=PROCESS_TIMEOUT_S)
    assert run.returncode == 1 and not run.of_type("hub"), run.explain()
    [fatal] = run.of_type("fatal")
    # core-amqp's name for amqp:unauthorized-access (a 401 status on the CBS reply).
    assert fatal["code"] == "UnauthorizedError", run.explain()


def test_iothub_connection_string_sample_follows_the_redirect(fresh_hub, device_client):
    """Azure's JS sample (iothubConnectionString): SASL PLAIN as <policy>@sas.root.<hub> with a
    token for <host>/messages/events, a receiver on messages/events/$management, the redirect's
    info parsed into an Event Hubs connection string, then the EventHubConsumerClient."""
    hub = fresh_hub
    device = unique_id("noderedir")
    sent = send_interleaved(device_client, hub, [device], 3)
    run = run_node(
        "iothub_connection_string.mjs",
        hub,
        hub.service_cs("service"),
        "--count",
        "3",
        "--device",
        device,
        "--timeout",
        str(READ_TIMEOUT_S),
        timeout=PROCESS_TIMEOUT_S,
    )
    redirects = run.of_type("redirect")
    assert len(redirects) == 1, run.explain()
    r: dict[str, Any] = redirects[0]
    entity = events_cs(hub).split("EntityPath=", 1)[1].split(";")[0]
    assert r["condition"] == "amqp:link:redirect"
    assert r["hostname"] == hub.hostname and r["networkHost"] == hub.hostname, r
    assert r["port"] == 5671, r
    assert r["address"] == f"amqps://{hub.hostname}:5671/{entity}/$management", r
    assert r["entityPath"] == entity, r
    assert run.returncode == 0, run.explain()
    assert not run.errors, run.explain()
    assert_read_in_order(run, sent)
