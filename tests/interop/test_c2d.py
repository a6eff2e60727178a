"""Cloud-to-device messages end to end with the official Python SDKs, unchanged.

The back end sends with azure-iot-hub 2.7.0's `IoTHubRegistryManager.send_c2d_message` (uamqp:
AMQP/TLS on 5671, or AMQP over WebSockets on 443 with
`from_connection_string(cs, transport_type=uamqp.TransportType.AmqpOverWebsocket)`); an
azure-iot-device 2.14.0 `IoTHubDeviceClient` receives in `on_message_received` over MQTT/TLS or
MQTT over WebSockets; the back end reads delivery feedback with `IoTHubHttpRuntimeManager`'s
HTTPS calls and purges a queue with the generated
`protocol.cloud_to_device_messages.purge_cloud_to_device_message_queue`. uamqp trusts the hub
through SSL_CERT_FILE (conftest points it at the hub of the test).

The module's hub sends feedback every FEEDBACK_INTERVAL_MS instead of IoT Hub's 15 s
(`serve --c2d-feedback-interval-ms`); the rules checked are IoT Hub's (messaging-protocol B).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest

from c2dlib import (
    FAST_FEEDBACK,
    FEEDBACK_INTERVAL_MS,
    FeedbackLog,
    SendTimeout,
    close_registry,
    connect_receiver,
    expiry_ms,
    parse_time,
    registry,
    send_c2d,
)
from harness import Hub, assert_iothub_error, unique_id, wait_until

pytestmark = pytest.mark.device

SEND_FAILURE = "C2D message send failure"  # what the SDK raises when the hub rejects a transfer


@pytest.fixture(scope="module")
def hub(module_hub_factory) -> Hub:
    return module_hub_factory(extra_args=FAST_FEEDBACK)


@pytest.fixture(scope="module")
def feedback(hub: Hub) -> FeedbackLog:
    return FeedbackLog(hub)


@pytest.fixture
def service(hub: Hub):
    """Factory of registry managers (one uamqp connection each), closed at teardown."""
    made = []

    def make(**kwargs):
        rm = registry(hub, **kwargs)
        made.append(rm)
        return rm

    yield make
    for rm in made:
        close_registry(rm)


def mid(tag: str = "m") -> str:
    return f"{tag}-{uuid.uuid4()}"


def c2d_count(hub: Hub, device_id: str) -> int:
    return hub.registry().get_device(device_id).cloud_to_device_message_count


def refused(rm, device_id: str, data, properties=None) -> Exception:
    """The exception send_c2d_message raised; fails when it returned or hung."""
    __tracebackhide__ = True
    try:
        send_c2d(rm, device_id, data, properties)
    except SendTimeout:
        raise
    except Exception as e:  # noqa: BLE001 - the SDK raises plain Exception
        return e
    raise AssertionError(f"send_c2d_message({device_id!r}) was accepted")


# ---- delivery ------------------------------------------------------------------------------


@pytest.mark.parametrize("device_transport", ["mqtt", "websockets"])
def test_message_reaches_the_device_with_its_properties(
    hub, service, device_client, feedback, device_transport
):
    device_id = unique_id("c2d")
    client, inbox = connect_receiver(
        device_client, hub, device_id, websockets=(device_transport == "websockets")
    )
    message_id = mid()
    expiry = expiry_ms(3600)
    props = {
        "messageId": message_id,
        "correlationId": "corr-1",
        "contentType": "application/json",
        "contentEncoding": "utf-8",
        "expiryTimeUtc": expiry,
        "iothub-ack": "full",
        "prop1": "value1",
        "a b/c": "x&y=z%",
    }
    body = '{"command": "reboot", "delay": 5}'
    send_c2d(service(), device_id, body, props)

    [msg] = inbox.wait_for(1)
    assert msg.data == body.encode()
    assert msg.message_id == message_id
    assert msg.correlation_id == "corr-1"
    assert msg.content_type == "application/json"
    assert msg.content_encoding == "utf-8"
    assert msg.custom_properties == {"prop1": "value1", "a b/c": "x&y=z%"}
    assert msg.ack == "full"
    assert msg.expiry_time_utc, "no $.exp on the delivery of a message with an expiry"
    got = parse_time(msg.expiry_time_utc)
    want = dt.datetime.fromtimestamp(expiry / 1000, dt.timezone.utc)
    assert abs((got - want).total_seconds()) < 1.0, (msg.expiry_time_utc, want)
    assert inbox.quiet(1, 1.0) == [], "the message was delivered twice"

    # The device's PUBACK completed it: Success feedback, as ack=full asked.
    rec = feedback.wait_for([message_id])[message_id]
    assert rec["statusCode"] == "Success" and rec["description"] == "Success", rec
    assert rec["deviceId"] == device_id
    assert rec["deviceGenerationId"] == hub.registry().get_device(device_id).generation_id
    wait_until(lambda: c2d_count(hub, device_id) == 0, 10, what="cloudToDeviceMessageCount 0 after delivery")


def test_service_over_amqp_websockets(hub, service, device_client, feedback):
    device_id = unique_id("c2dws")
    client, inbox = connect_receiver(device_client, hub, device_id)
    rm = service(websockets=True)
    ids = [mid("ws") for _ in range(3)]
    for i, m in enumerate(ids):
        send_c2d(rm, device_id, f"over websockets {i}", {"messageId": m, "iothub-ack": "full", "i": str(i)})
    msgs = inbox.wait_for(3)
    assert [m.message_id for m in msgs] == ids
    assert [m.data for m in msgs] == [f"over websockets {i}".encode() for i in range(3)]
    assert [m.custom_properties for m in msgs] == [{"i": str(i)} for i in range(3)]
    recs = feedback.wait_for(ids)
    assert {r["statusCode"] for r in recs.values()} == {"Success"}


def test_the_sdk_default_message_id_is_a_uuid_and_arrives(hub, service, device_client):
    """Without a messageId the SDK sets a uuid4 string; the device sees that id."""
    device_id = unique_id("c2dmid")
    client, inbox = connect_receiver(device_client, hub, device_id)
    send_c2d(service(), device_id, "no id given")
    [msg] = inbox.wait_for(1)
    assert msg.data == b"no id given"
    assert uuid.UUID(msg.message_id).version == 4, msg.message_id
    assert msg.ack is None and msg.custom_properties == {}
    assert msg.correlation_id is None and msg.content_type is None


def test_messages_arrive_in_send_order(hub, service, device_client):
    device_id = unique_id("c2dord")
    client, inbox = connect_receiver(device_client, hub, device_id)
    rm = service()
    sent = []
    for i in range(12):
        body = bytes(range(256)) if i == 5 else f"message {i}".encode()
        m = mid(f"ord{i}")
        send_c2d(rm, device_id, body, {"messageId": m, "seq": str(i)})
        sent.append((m, body))
    msgs = inbox.wait_for(12)
    assert [m.message_id for m in msgs] == [s[0] for s in sent]
    assert [m.data for m in msgs] == [s[1] for s in sent]
    assert inbox.quiet(12, 1.0) == []


def test_an_offline_device_gets_its_queue_when_it_connects(hub, service, device_client, feedback):
    device_id = unique_id("c2doff")
    hub.device_cs(device_id)  # registered, never connected
    rm = service()
    ids = [mid("off") for _ in range(3)]
    for i, m in enumerate(ids):
        send_c2d(rm, device_id, f"queued {i}", {"messageId": m, "iothub-ack": "positive"})
    assert c2d_count(hub, device_id) == 3
    time.sleep(FEEDBACK_INTERVAL_MS / 1000 * 3)
    feedback.drain()
    assert not any(feedback.of(m) for m in ids), "feedback before the device took anything"

    client, inbox = connect_receiver(device_client, hub, device_id)
    msgs = inbox.wait_for(3)
    assert [m.message_id for m in msgs] == ids
    assert [m.data for m in msgs] == [f"queued {i}".encode() for i in range(3)]
    assert all(m.ack == "positive" for m in msgs)
    recs = feedback.wait_for(ids)
    assert [recs[m]["statusCode"] for m in ids] == ["Success"] * 3
    wait_until(lambda: c2d_count(hub, device_id) == 0, 10, what="cloudToDeviceMessageCount 0")


def test_ack_decides_which_outcomes_give_feedback(hub, service, device_client, feedback):
    """none: never; positive: on completion; negative: only dead-lettered; full: both."""
    device_id = unique_id("c2dack")
    client, inbox = connect_receiver(device_client, hub, device_id)
    rm = service()
    ids = {ack: mid(ack) for ack in ("none", "positive", "negative", "full")}
    send_c2d(rm, device_id, "no ack", {"messageId": ids["none"]})
    for ack in ("positive", "negative", "full"):
        send_c2d(rm, device_id, ack, {"messageId": ids[ack], "iothub-ack": ack})
    msgs = inbox.wait_for(4)
    assert [m.ack for m in msgs] == [None, "positive", "negative", "full"]
    # Completed in order, so once the last one's record is in, the others' would be too.
    recs = feedback.wait_for([ids["positive"], ids["full"]])
    assert recs[ids["positive"]]["statusCode"] == "Success"
    assert recs[ids["full"]]["statusCode"] == "Success"
    time.sleep(FEEDBACK_INTERVAL_MS / 1000 * 3)
    feedback.drain()
    assert feedback.of(ids["none"]) == [] and feedback.of(ids["negative"]) == []


def test_http_feedback_calls_lock_abandon_and_complete(hub, service, device_client, feedback):
    """receive_feedback_notification locks a batch (ETag = lock token), abandon gives it back
    at once, complete removes it; an empty queue answers 204."""
    device_id = unique_id("c2dfb")
    client, inbox = connect_receiver(device_client, hub, device_id)
    message_id = mid("fb")
    send_c2d(service(), device_id, "feedback please", {"messageId": message_id, "iothub-ack": "full"})
    inbox.wait_for(1)

    deadline = time.monotonic() + 20
    mine = None
    while mine is None:
        assert time.monotonic() < deadline, f"no feedback batch held {message_id}"
        batch = feedback.receive()
        if batch is None:
            time.sleep(0.2)
        elif any(r["originalMessageId"] == message_id for r in batch.records):
            mine = batch
        else:
            feedback.complete(batch)  # other tests' records: kept in feedback.records
    # Locked: another receive does not hand the same batch out again.
    other = feedback.receive()
    assert other is None or other.lock_token != mine.lock_token
    if other is not None:
        feedback.complete(other)
    feedback.abandon(mine)
    again = feedback.receive()
    assert again is not None, "the abandoned feedback batch did not come back"
    assert again.records == mine.records
    feedback.complete(again)
    rec = next(r for r in again.records if r["originalMessageId"] == message_id)
    assert rec["statusCode"] == "Success" and rec["deviceId"] == device_id
    # Completed: never handed out again.
    time.sleep(FEEDBACK_INTERVAL_MS / 1000 * 3)
    feedback.drain()
    assert len(feedback.of(message_id)) == 1
    # A lock token that is no longer held is refused by the SDK call (not a silent 204).
    from msrest.exceptions import HttpOperationError

    with pytest.raises(HttpOperationError):
        feedback.hrm.complete_feedback_notification(again.lock_token)
    assert feedback.capture.last.status_code in (404, 412), feedback.capture.last.text


# ---- the queue: purge, depth, expiry -------------------------------------------------------


def test_purge_empties_the_queue_with_purged_feedback(hub, service, device_client, feedback):
    device_id = unique_id("c2dpurge")
    hub.device_cs(device_id)
    rm = service()
    acked = [mid("purge") for _ in range(2)]
    for m in acked:
        send_c2d(rm, device_id, "to be purged", {"messageId": m, "iothub-ack": "full"})
    for _ in range(2):
        send_c2d(rm, device_id, "to be purged, no ack")
    assert c2d_count(hub, device_id) == 4

    result = hub.registry().protocol.cloud_to_device_messages.purge_cloud_to_device_message_queue(device_id)
    assert result.total_messages_purged == 4
    assert result.device_id == device_id
    assert c2d_count(hub, device_id) == 0
    recs = feedback.wait_for(acked)
    assert [recs[m]["statusCode"] for m in acked] == ["Purged", "Purged"]

    again = hub.registry().protocol.cloud_to_device_messages.purge_cloud_to_device_message_queue(device_id)
    assert again.total_messages_purged == 0
    client, inbox = connect_receiver(device_client, hub, device_id)
    assert inbox.quiet(0, 2.0) == [], "a purged message was delivered"

    resp = hub.rest("DELETE", f"/devices/{unique_id('nosuch')}/commands")
    assert_iothub_error(resp, 404, 404001, "DeviceNotFound")


def test_the_51st_queued_message_is_refused(hub, service, device_client):
    device_id = unique_id("c2dfull")
    hub.device_cs(device_id)
    rm = service()
    for i in range(50):
        send_c2d(rm, device_id, f"fill {i}", {"messageId": f"fill-{i}"})
    assert c2d_count(hub, device_id) == 50
    err = refused(rm, device_id, "one too many", {"messageId": "fill-50"})
    assert str(err) == SEND_FAILURE, repr(err)
    assert c2d_count(hub, device_id) == 50
    # The device gets the 50, in order, and not the refused one.
    client, inbox = connect_receiver(device_client, hub, device_id)
    msgs = inbox.wait_for(50, timeout=40)
    assert [m.message_id for m in msgs] == [f"fill-{i}" for i in range(50)]
    assert inbox.quiet(50, 1.0) == []
    # The queue has room again: the same sender link is still usable.
    wait_until(lambda: c2d_count(hub, device_id) == 0, 10, what="queue drained")
    send_c2d(rm, device_id, "room again", {"messageId": "fill-after"})
    assert inbox.wait_for(51)[-1].message_id == "fill-after"


def test_an_expired_message_is_never_delivered_and_reported_expired(hub, service, device_client, feedback):
    device_id = unique_id("c2dttl")
    hub.device_cs(device_id)
    rm = service()
    doomed = mid("ttl")
    send_c2d(
        rm,
        device_id,
        "too late",
        {"messageId": doomed, "iothub-ack": "full", "expiryTimeUtc": expiry_ms(1.5)},
    )
    assert c2d_count(hub, device_id) == 1
    # The hub sweeps every second: Expired feedback without the device ever connecting.
    rec = feedback.wait_for([doomed], timeout=15)[doomed]
    assert rec["statusCode"] == "Expired", rec
    assert rec["deviceId"] == device_id
    assert c2d_count(hub, device_id) == 0
    client, inbox = connect_receiver(device_client, hub, device_id)
    alive = mid("alive")
    send_c2d(rm, device_id, "on time", {"messageId": alive, "expiryTimeUtc": expiry_ms(600)})
    [msg] = inbox.wait_for(1)
    assert msg.message_id == alive, f"got {msg.message_id}: the expired message was delivered"
    assert inbox.quiet(1, 1.5) == []


def test_an_expired_message_met_at_connect_is_dropped(hub, service, device_client, feedback):
    """Expired between the send and the device's connect, before or after a sweep: either way
    never delivered, one Expired record."""
    device_id = unique_id("c2dttl2")
    hub.device_cs(device_id)
    rm = service()
    doomed = mid("ttl2")
    send_c2d(
        rm,
        device_id,
        "too late",
        {"messageId": doomed, "iothub-ack": "negative", "expiryTimeUtc": expiry_ms(1.0)},
    )
    time.sleep(1.2)
    client, inbox = connect_receiver(device_client, hub, device_id)
    assert inbox.quiet(0, 2.0) == [], "an expired message was delivered"
    rec = feedback.wait_for([doomed], timeout=15)[doomed]
    assert rec["statusCode"] == "Expired"


# ---- refusals ------------------------------------------------------------------------------


def test_an_unknown_device_is_refused_and_the_link_stays_usable(hub, service, device_client):
    rm = service()
    err = refused(rm, unique_id("nosuch"), "nobody home")
    assert str(err) == SEND_FAILURE, repr(err)
    # IoT Hub rejects the one transfer; the sender link carries on.
    device_id = unique_id("c2dafter")
    client, inbox = connect_receiver(device_client, hub, device_id)
    send_c2d(rm, device_id, "after a refusal")
    assert inbox.wait_for(1)[0].data == b"after a refusal"


def test_a_body_over_64_kib_is_refused(hub, service, device_client):
    device_id = unique_id("c2dbig")
    client, inbox = connect_receiver(device_client, hub, device_id)
    rm = service()
    err = refused(rm, device_id, b"x" * (64 * 1024 + 1), {"messageId": "too-big"})
    assert str(err) == SEND_FAILURE, repr(err)
    assert c2d_count(hub, device_id) == 0
    body = bytes(i % 251 for i in range(63 * 1024))
    send_c2d(rm, device_id, body, {"messageId": "big-but-fine"})
    [msg] = inbox.wait_for(1)
    assert msg.message_id == "big-but-fine" and msg.data == body


@pytest.mark.parametrize("who", ["registryRead", "device", "wrong-key"])
def test_a_sender_without_service_connect_is_refused(hub, service, device_client, who):
    device_id = unique_id("c2dauth")
    client, inbox = connect_receiver(device_client, hub, device_id)
    if who == "wrong-key":
        creds = hub.credentials("service")
        key = ("B" if creds.key[0] == "A" else "A") + creds.key[1:]
        rm = service(cs=f"HostName={creds.host};SharedAccessKeyName={creds.policy};SharedAccessKey={key}")
    else:
        rm = service(policy=who)
    refused(rm, device_id, "not allowed", {"messageId": "unauthorized"})
    assert inbox.quiet(0, 1.5) == [], "a message from a sender without ServiceConnect was delivered"
    assert c2d_count(hub, device_id) == 0
    # The `service` policy (ServiceConnect) may send.
    send_c2d(service(policy="service"), device_id, "allowed", {"messageId": "authorized"})
    assert inbox.wait_for(1)[0].message_id == "authorized"


def test_a_message_already_expired_is_never_delivered(hub, service, device_client, feedback):
    """An expiry in the past: refused at the send, or accepted and dead-lettered as Expired;
    either way the device never sees it."""
    device_id = unique_id("c2dpast")
    client, inbox = connect_receiver(device_client, hub, device_id)
    rm = service()
    stale = mid("past")
    try:
        props = {"messageId": stale, "iothub-ack": "full", "expiryTimeUtc": expiry_ms(-60)}
        send_c2d(rm, device_id, "stale", props)
    except SendTimeout:
        raise
    except Exception as e:  # noqa: BLE001 - refused on arrival
        assert str(e) == SEND_FAILURE, repr(e)
    else:
        assert feedback.wait_for([stale])[stale]["statusCode"] == "Expired"
    fresh = mid("fresh")
    send_c2d(rm, device_id, "fresh", {"messageId": fresh})
    [msg] = inbox.wait_for(1)
    assert msg.message_id == fresh, "the already expired message was delivered"
    assert inbox.quiet(1, 1.0) == []


def test_a_message_without_to_is_refused(hub, service, device_client):
    """The SDK always sets `to`; its own uamqp SendClient, handed a message without one, gets
    the transfer rejected (nothing is queued anywhere)."""
    import threading

    import uamqp

    device_id = unique_id("c2dnoto")
    client, inbox = connect_receiver(device_client, hub, device_id)
    rm = service()
    send_c2d(rm, device_id, "opens the link")
    inbox.wait_for(1)
    sender = rm.amqp_svc_client.amqp_client
    props = uamqp.message.MessageProperties(message_id="no-to")
    results: list = []

    def run() -> None:
        sender.queue_message(uamqp.Message(b"addressed to nobody", properties=props))
        results.extend(sender.send_all_messages(close_on_done=False))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "no disposition within 30 s for a message without `to`"
    assert results == [uamqp.constants.MessageState.SendFailed], results
    assert inbox.quiet(1, 1.0) == []
    send_c2d(rm, device_id, "still usable")
    assert inbox.wait_for(2)[1].data == b"still usable"


def test_deleting_a_device_drops_its_queue(hub, service, device_client):
    """The queue belongs to the device identity: re-created under the same id, the device
    starts empty."""
    device_id = unique_id("c2ddel")
    hub.device_cs(device_id)
    rm = service()
    for i in range(3):
        send_c2d(rm, device_id, f"for the old device {i}")
    assert c2d_count(hub, device_id) == 3
    reg = hub.registry()
    reg.delete_device(device_id)
    client, inbox = connect_receiver(device_client, hub, device_id)  # re-creates it
    assert c2d_count(hub, device_id) == 0
    assert inbox.quiet(0, 2.0) == [], "messages of the deleted device reached the new one"
    send_c2d(rm, device_id, "for the new device")
    assert inbox.wait_for(1)[0].data == b"for the new device"


# ---- MQTT delivery rules, seen by a hand-built client ----------------------------------------


def raw_subscribed(hub: Hub, device_id: str, key: str):
    import mqtt_raw as m

    conn = m.RawMqtt(hub.ip, hub.mqtt_port, str(hub.ca_pem))
    assert m.connack_code(m.device_connect(conn, hub.hostname, device_id, key, clean_session=False)) == 0
    conn.send(m.subscribe_packet(1, [(f"devices/{device_id}/messages/devicebound/#", 1)]))
    suback = conn.read_packet(10)
    assert suback.ptype == m.SUBACK and suback.body[2:] == b"\x01", suback
    return conn


def raw_publishes(conn, n: int, timeout: float = 10.0) -> list:
    import mqtt_raw as m

    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(got)} of {n} PUBLISHes within {timeout}s: {got}"
        p = conn.read_packet(remaining)
        if p.ptype == m.PUBLISH:
            got.append(p)
    return got


def bag_mid(topic: str) -> str | None:
    import urllib.parse

    for item in topic.split("/", 4)[4].split("&"):
        k, _, v = item.partition("=")
        if urllib.parse.unquote(k) == "$.mid":
            return urllib.parse.unquote(v)
    return None


def test_unacknowledged_messages_come_again_with_dup_after_a_reconnect(hub, service):
    import mqtt_raw as m

    device_id = unique_id("c2ddup")
    key = hub.device_key(device_id)
    rm = service()
    ids = [f"dup-{i}" for i in range(3)]
    with raw_subscribed(hub, device_id, key) as conn:
        for i in ids:
            send_c2d(rm, device_id, i, {"messageId": i})
        first = raw_publishes(conn, 3)
        assert [bag_mid(p.publish_parts()[0]) for p in first] == ids
        assert all(p.qos == 1 and not p.flags & 0x08 for p in first), first
        topic = first[0].publish_parts()[0]
        assert topic.startswith(f"devices/{device_id}/messages/devicebound/"), topic
        assert "%24.to=%2Fdevices%2F" in topic, topic
    with m.RawMqtt(hub.ip, hub.mqtt_port, str(hub.ca_pem)) as conn:
        assert m.connack_code(m.device_connect(conn, hub.hostname, device_id, key, clean_session=False)) == 0
        again = raw_publishes(conn, 3)
        assert [bag_mid(p.publish_parts()[0]) for p in again] == ids
        assert all(p.qos == 1 and p.flags & 0x08 for p in again), "redelivery without DUP"
        assert [p.publish_parts()[2] for p in again] == [i.encode() for i in ids]
        for p in again:
            conn.send(m.puback_packet(p.publish_parts()[1]))
        assert not [p for p in conn.drain(1.0) if p.ptype == m.PUBLISH]
    wait_until(lambda: c2d_count(hub, device_id) == 0, 10, what="queue empty after the PUBACKs")


def test_a_puback_out_of_order_closes_the_connection_and_loses_nothing(hub, service):
    """IoT Hub requires PUBACKs in PUBLISH order (it closes the connection otherwise); the
    messages stay queued and come again."""
    import mqtt_raw as m

    device_id = unique_id("c2dooo")
    key = hub.device_key(device_id)
    rm = service()
    with raw_subscribed(hub, device_id, key) as conn:
        for i in range(2):
            send_c2d(rm, device_id, f"ooo-{i}", {"messageId": f"ooo-{i}"})
        first, second = raw_publishes(conn, 2)
        conn.send(m.puback_packet(second.publish_parts()[1]))
        conn.expect_closed(within=10)
    with m.RawMqtt(hub.ip, hub.mqtt_port, str(hub.ca_pem)) as conn:
        assert m.connack_code(m.device_connect(conn, hub.hostname, device_id, key, clean_session=False)) == 0
        again = raw_publishes(conn, 2)
        assert [bag_mid(p.publish_parts()[0]) for p in again] == ["ooo-0", "ooo-1"]
        for p in again:
            conn.send(m.puback_packet(p.publish_parts()[1]))
        assert not [p for p in conn.drain(1.0) if p.ptype == m.PUBLISH]
    wait_until(lambda: c2d_count(hub, device_id) == 0, 10, what="queue empty after in-order PUBACKs")
