"""Telemetry end to end: the official device SDK (azure-iot-device) sends device-to-cloud
messages over MQTT/TLS and MQTT over WebSockets; the official Event Hubs SDK (azure-eventhub,
pure-Python AMQP) reads them back from the built-in Event Hub-compatible endpoint over
AMQP/TLS on 5671 and AMQP over WebSockets on 443, with the connection string
`twinhub connection-string --events` prints. Nothing in the SDKs is patched; trust is given
with the SDK's own `connection_verify` keyword, or with `twinhub trust --python`.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness import Hub, hub_binary, unique_id

pytestmark = pytest.mark.device

RECEIVE_TIMEOUT_S = 30.0


def events_cs(hub: Hub, *extra: str) -> str:
    out = hub.cli("connection-string", "--events", "--data-dir", str(hub.data_dir), *extra)
    return out.strip()


def consumer(hub: Hub, cs: str | None = None, **kwargs: Any):
    from azure.eventhub import EventHubConsumerClient

    kwargs.setdefault("connection_verify", str(hub.ca_pem))
    return EventHubConsumerClient.from_connection_string(
        cs or events_cs(hub), consumer_group=kwargs.pop("consumer_group", "$default"), **kwargs
    )


def collect(client, want, *, timeout: float = RECEIVE_TIMEOUT_S, **receive_kwargs: Any) -> list:
    """Runs client.receive_batch in a thread until `want(events)` is true or the time is up.

    receive_batch, as Azure's read-d2c-messages quickstart uses: the SDK's event processor
    serves its partitions in turn, and with `receive` each turn hands over a single event
    after up to 0.2 s on every idle partition, which is slow whatever the server.
    """
    events: list = []
    done = threading.Event()
    errors: list[BaseException] = []

    def on_batch(partition_context, batch):
        events.extend(batch)
        if want(events):
            done.set()

    def on_error(partition_context, error):
        errors.append(error)

    receive_kwargs.setdefault("starting_position", "-1")
    receive_kwargs.setdefault("max_batch_size", 300)
    t = threading.Thread(
        target=client.receive_batch,
        kwargs={"on_event_batch": on_batch, "on_error": on_error, **receive_kwargs},
        daemon=True,
    )
    t.start()
    done.wait(timeout)
    client.close()
    t.join(15)
    assert not t.is_alive(), "EventHubConsumerClient.receive_batch did not return after close()"
    return events


def of_device(events: list, device_id: str) -> list:
    return [
        e
        for e in events
        if e.system_properties.get(b"iothub-connection-device-id") == device_id.encode()
    ]


def send_messages(device_client, hub: Hub, device_id: str, n: int, **kwargs: Any) -> list[dict]:
    from azure.iot.device import Message

    client = device_client(hub.device_cs(device_id), **kwargs)
    client.connect()
    sent = []
    for i in range(n):
        body = {"temperature": 20 + i, "humidity": 60, "i": i}
        msg = Message(json.dumps(body))
        msg.message_id = str(uuid.uuid4())
        msg.correlation_id = f"corr-{i}"
        msg.content_type = "application/json"
        msg.content_encoding = "utf-8"
        msg.custom_properties["temperatureAlert"] = "true" if i % 2 else "false"
        msg.custom_properties["tornado-warning"] = "yes"
        client.send_message(msg)  # returns after the PUBACK
        sent.append({"body": body, "message_id": msg.message_id, "i": i})
    return sent


@pytest.mark.parametrize("transport", ["mqtt", "websockets"])
def test_device_messages_read_back_with_the_event_hubs_sdk(hub, device_client, transport):
    device_id = unique_id("tel")
    sent = send_messages(device_client, hub, device_id, 5, websockets=(transport == "websockets"))
    events = of_device(
        collect(consumer(hub), lambda evs: len(of_device(evs, device_id)) >= 5), device_id
    )
    assert len(events) == 5, f"read {len(events)} of 5 messages"
    for ev, want in zip(events, sent):  # one device: one partition, in order
        assert json.loads(ev.body_as_str()) == want["body"]
        assert ev.properties[b"temperatureAlert"] == (b"true" if want["i"] % 2 else b"false")
        assert ev.properties[b"tornado-warning"] == b"yes"
        sp = ev.system_properties
        assert sp[b"message-id"] == want["message_id"].encode() or sp[b"message-id"] == want["message_id"]
        assert sp[b"correlation-id"] in (f"corr-{want['i']}".encode(), f"corr-{want['i']}")
        assert sp[b"content-type"] in (b"application/json", "application/json")
        assert sp[b"iothub-message-source"] == b"Telemetry"
        assert b"iothub-connection-auth-generation-id" in sp
        assert b"iothub-enqueuedtime" in sp
        assert isinstance(ev.sequence_number, int)
        assert isinstance(ev.offset, str) and ev.offset.isdigit()
        assert ev.enqueued_time is not None
    seqs = [e.sequence_number for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5


def test_amqp_over_websockets(hub, device_client):
    from azure.eventhub import TransportType

    device_id = unique_id("telws")
    send_messages(device_client, hub, device_id, 3)
    client = consumer(hub, transport_type=TransportType.AmqpOverWebsocket)
    events = of_device(collect(client, lambda evs: len(of_device(evs, device_id)) >= 3), device_id)
    assert [json.loads(e.body_as_str())["i"] for e in events] == [0, 1, 2]


def test_partition_metadata_agrees_with_what_is_read(hub, device_client):
    device_id = unique_id("telmeta")
    send_messages(device_client, hub, device_id, 4)
    client = consumer(hub)
    props = client.get_eventhub_properties()
    ids = client.get_partition_ids()
    assert ids == props["partition_ids"] == ["0", "1", "2", "3"]
    total = 0
    for pid in ids:
        p = client.get_partition_properties(pid)
        assert p["id"] == pid
        if p["is_empty"]:
            continue
        total += p["last_enqueued_sequence_number"] - p["beginning_sequence_number"] + 1
    client.close()
    events = collect(consumer(hub), lambda evs: len(evs) >= total)
    assert len(events) == total
    with pytest.raises(Exception):
        c = consumer(hub)
        try:
            c.get_partition_properties("99")
        finally:
            c.close()


def test_resuming_from_a_stored_offset_gives_only_later_events(hub, device_client):
    device_id = unique_id("telres")
    send_messages(device_client, hub, device_id, 6)
    events = of_device(
        collect(consumer(hub), lambda evs: len(of_device(evs, device_id)) >= 6), device_id
    )
    assert len(events) == 6
    partition = None
    for pid in ["0", "1", "2", "3"]:
        c = consumer(hub)
        got = collect(
            c,
            lambda evs: len(of_device(evs, device_id)) >= 6,
            partition_id=pid,
            timeout=5,
        )
        if of_device(got, device_id):
            partition = pid
            break
    assert partition is not None, "no partition holds the device's events"
    checkpoint = events[2]
    later = of_device(
        collect(
            consumer(hub),
            lambda evs: len(of_device(evs, device_id)) >= 3,
            partition_id=partition,
            starting_position=checkpoint.offset,
        ),
        device_id,
    )
    assert [json.loads(e.body_as_str())["i"] for e in later] == [3, 4, 5]
    by_seq = of_device(
        collect(
            consumer(hub),
            lambda evs: len(of_device(evs, device_id)) >= 3,
            partition_id=partition,
            starting_position=checkpoint.sequence_number,
            starting_position_inclusive=True,
        ),
        device_id,
    )
    assert [json.loads(e.body_as_str())["i"] for e in by_seq][:4] == [2, 3, 4, 5]


def test_latest_reads_only_new_events(hub, device_client):
    device_id = unique_id("tellat")
    send_messages(device_client, hub, device_id, 2)
    client = consumer(hub)

    def later():
        time.sleep(3)
        send_messages(device_client, hub, device_id, 1)

    t = threading.Thread(target=later, daemon=True)
    t.start()
    events = of_device(
        collect(client, lambda evs: len(of_device(evs, device_id)) >= 1, starting_position="@latest"),
        device_id,
    )
    t.join(30)
    assert [json.loads(e.body_as_str())["i"] for e in events] == [0]


def test_a_bad_key_is_refused(hub):
    from azure.eventhub.exceptions import AuthenticationError, EventHubError

    cs = events_cs(hub)
    parts = dict(p.split("=", 1) for p in cs.split(";") if p)
    bad = cs.replace(parts["SharedAccessKey"], "AAAA" + parts["SharedAccessKey"][4:])
    client = consumer(hub, cs=bad, retry_total=0)
    with pytest.raises((AuthenticationError, EventHubError)):
        try:
            client.get_partition_ids()
        finally:
            client.close()


def test_an_unknown_consumer_group_is_not_found(hub):
    errors: list = []
    client = consumer(hub, consumer_group="nosuchgroup", retry_total=0)

    def on_error(ctx, error):
        errors.append(error)

    t = threading.Thread(
        target=client.receive,
        kwargs={"on_event": lambda c, e: None, "on_error": on_error, "partition_id": "0"},
        daemon=True,
    )
    t.start()
    deadline = time.monotonic() + 20
    while not errors and time.monotonic() < deadline:
        time.sleep(0.1)
    client.close()
    t.join(15)
    assert errors, "receiving from an unknown consumer group raised nothing"
    assert "nosuchgroup" in str(errors[0]) or "not found" in str(errors[0]).lower() or "NotFound" in repr(errors[0])


def test_created_consumer_groups_can_read(hub, device_client):
    hub.cli("consumer-group", "create", "analytics", "--data-dir", str(hub.data_dir))
    listed = hub.cli("consumer-group", "list", "--data-dir", str(hub.data_dir))
    assert "$Default" in listed and "analytics" in listed
    device_id = unique_id("telcg")
    send_messages(device_client, hub, device_id, 2)
    events = of_device(
        collect(
            consumer(hub, consumer_group="analytics"),
            lambda evs: len(of_device(evs, device_id)) >= 2,
        ),
        device_id,
    )
    assert len(events) == 2
    hub.cli("consumer-group", "delete", "analytics", "--data-dir", str(hub.data_dir))
    assert "analytics" not in hub.cli("consumer-group", "list", "--data-dir", str(hub.data_dir))


def test_every_acknowledged_message_survives_kill_9(fresh_hub, device_client):
    from azure.iot.device import Message

    hub = fresh_hub
    device_id = unique_id("telkill")
    client = device_client(hub.device_cs(device_id))
    client.connect()
    acked: list[int] = []
    stop = threading.Event()

    def burst():
        i = 0
        while not stop.is_set():
            try:
                client.send_message(Message(json.dumps({"i": i})))
            except Exception:
                return
            acked.append(i)
            i += 1

    t = threading.Thread(target=burst, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    hub.kill()
    stop.set()
    t.join(30)
    assert len(acked) >= 50, f"only {len(acked)} messages acknowledged before the kill"
    hub.start()
    want = set(acked)
    events = of_device(
        collect(
            consumer(hub),
            lambda evs: want <= {json.loads(e.body_as_str())["i"] for e in of_device(evs, device_id)},
        ),
        device_id,
    )
    got = {json.loads(e.body_as_str())["i"] for e in events}
    assert want <= got, f"lost {len(want - got)} acknowledged messages: {sorted(want - got)[:10]}"


def test_emulator_mode_on_the_plaintext_port(hub_factory, device_client):
    hub = hub_factory(extra_args=("--amqp-plain-port", "5672"))
    cs = events_cs(hub, "--plain")
    assert "UseDevelopmentEmulator=true" in cs
    device_id = unique_id("telplain")
    send_messages(device_client, hub, device_id, 2)
    from azure.eventhub import EventHubConsumerClient

    client = EventHubConsumerClient.from_connection_string(cs, consumer_group="$Default")
    events = of_device(collect(client, lambda evs: len(of_device(evs, device_id)) >= 2), device_id)
    assert len(events) == 2


def test_twinhub_trust_python_lets_the_sdk_trust_the_hub_unchanged(hub, device_client):
    """`twinhub trust --python` puts the dev CA in certifi's bundle: the consumer then needs no
    connection_verify at all, as against Azure. Undone with --remove, even on failure."""
    import sys

    from azure.eventhub import EventHubConsumerClient

    device_id = unique_id("teltrust")
    send_messages(device_client, hub, device_id, 2)
    data = ("--data-dir", str(hub.data_dir))
    print(hub.cli("trust", *data))  # without flags: says what it would do, changes nothing
    hub.cli("trust", "--python", sys.executable, *data)
    try:
        client = EventHubConsumerClient.from_connection_string(
            events_cs(hub), consumer_group="$Default"
        )
        events = of_device(collect(client, lambda evs: len(of_device(evs, device_id)) >= 2), device_id)
        assert len(events) == 2
        again = hub.cli("trust", "--python", sys.executable, *data)
        assert "already holds" in again
    finally:
        hub.cli("trust", "--python", sys.executable, "--remove", *data)
    import certifi

    assert "twinhub development CA" not in Path(certifi.where()).read_text()


def test_rust_examples_send_and_read_telemetry_beside_the_python_sdks(hub, device_client):
    """send_telemetry (Rust) is read by azure-eventhub; azure-iot-device is read by
    read_d2c_messages (Rust)."""
    examples = hub_binary().parent / "examples"
    device_id = unique_id("telrust")
    env = hub.env()
    sent = subprocess.run(
        [
            str(examples / "send_telemetry"),
            "--connection-string",
            hub.device_cs(device_id),
            "--count",
            "3",
            "--interval-ms",
            "50",
        ],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr.decode()
    events = of_device(collect(consumer(hub), lambda evs: len(of_device(evs, device_id)) >= 3), device_id)
    assert len(events) == 3
    for e in events:
        body = json.loads(e.body_as_str())
        assert set(body) == {"temperature", "humidity"}
        assert e.properties[b"temperatureAlert"] in (b"true", b"false")

    other = unique_id("telpy")
    send_messages(device_client, hub, other, 2)
    read = subprocess.run(
        [
            str(examples / "read_d2c_messages"),
            "--connection-string",
            events_cs(hub),
            "--ca",
            str(hub.ca_pem),
            "--from-start",
            "--timeout",
            "8",
        ],
        env=env,
        capture_output=True,
        timeout=60,
    )
    out = read.stdout.decode()
    assert f"Device: {other}" in out, out[-2000:]
    assert out.count(f"Device: {other}") == 2
