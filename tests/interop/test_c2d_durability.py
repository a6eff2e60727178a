"""Cloud-to-device messages survive `kill -9` of the hub.

A send that azure-iot-hub's `send_c2d_message` returned from was settled by the hub only after
the message was durably queued; so after a SIGKILL and a restart on the same data dir every
such message must still reach its device: those queued for a device that was offline, and those
in flight to a device that had them but never answered with a PUBACK (delivered again; the DUP
flag is allowed). The in-flight device is a hand-built MQTT client (mqtt_raw) so it can hold
its PUBACKs; the offline device is the official azure-iot-device client.
"""

from __future__ import annotations

import threading
import time
import urllib.parse

import pytest

import mqtt_raw as m
from c2dlib import SendTimeout, close_registry, connect_receiver, registry, send_c2d
from harness import Hub, unique_id, wait_until

pytestmark = pytest.mark.device

C2D_FILTER = "devices/{}/messages/devicebound/#"


def c2d_properties(topic: str, device_id: str) -> dict[str, str | None]:
    """The property bag of a C2D PUBLISH topic, as the device SDK reads it (5th segment)."""
    prefix = f"devices/{device_id}/messages/devicebound/"
    assert topic.startswith(prefix), topic
    out: dict[str, str | None] = {}
    for item in topic[len(prefix) :].split("&"):
        if not item:
            continue
        k, eq, v = item.partition("=")
        out[urllib.parse.unquote(k)] = urllib.parse.unquote(v) if eq else None
    return out


def subscribe_raw(hub: Hub, device_id: str, key: str) -> m.RawMqtt:
    conn = m.RawMqtt(hub.ip, hub.mqtt_port, str(hub.ca_pem))
    assert m.connack_code(m.device_connect(conn, hub.hostname, device_id, key, clean_session=False)) == 0
    conn.send(m.subscribe_packet(1, [(C2D_FILTER.format(device_id), 1)]))
    suback = conn.read_packet(10)
    assert suback.ptype == m.SUBACK and suback.body[2:] == b"\x01", suback
    return conn


def publishes_without_puback(
    conn: m.RawMqtt, at_least: int, within: float, settle: float = 1.0
) -> list[m.Packet]:
    """Reads C2D PUBLISHes and never answers them: at least `at_least` within `within`
    seconds, then whatever else comes within `settle` seconds of quiet."""
    got: list[m.Packet] = []
    deadline = time.monotonic() + within
    while len(got) < at_least:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(got)} PUBLISHes within {within}s (want {at_least})"
        p = conn.read_packet(remaining)
        if p.ptype == m.PUBLISH:
            got.append(p)
    while True:
        try:
            p = conn.read_packet(settle)
        except TimeoutError:
            return got
        if p.ptype == m.PUBLISH:
            got.append(p)


def test_queued_and_in_flight_messages_survive_kill_9(fresh_hub: Hub, device_client):
    hub = fresh_hub
    raw_id, offline_id = unique_id("durraw"), unique_id("duroff")
    raw_key = hub.device_key(raw_id)
    hub.device_cs(offline_id)  # registered, never connected before the kill

    conn = subscribe_raw(hub, raw_id, raw_key)
    rm = registry(hub)
    raw_sent = [f"raw-{i}" for i in range(12)]
    off_sent = [f"off-{i}" for i in range(5)]
    try:
        for mid in raw_sent:
            send_c2d(rm, raw_id, f"body of {mid}", {"messageId": mid, "iothub-ack": "full"})
        for mid in off_sent:
            send_c2d(rm, offline_id, f"body of {mid}", {"messageId": mid})
    finally:
        close_registry(rm)

    # Some are in flight to the raw device (the hub keeps a few unacknowledged at once), the
    # rest wait behind them. None is answered.
    in_flight = publishes_without_puback(conn, at_least=1, within=10)
    flight_ids = [c2d_properties(p.publish_parts()[0], raw_id).get("$.mid") for p in in_flight]
    assert flight_ids == raw_sent[: len(flight_ids)], f"in-flight ids out of queue order: {flight_ids}"
    assert all(p.qos == 1 for p in in_flight), in_flight
    assert len(flight_ids) < len(raw_sent), "everything was in flight: nothing stayed queued behind"

    hub.kill()
    conn.close()
    hub.start()

    # The raw device comes back with its stored session (CleanSession=0; it does not subscribe
    # again, as the official SDK does not) and now acknowledges everything.
    with m.RawMqtt(hub.ip, hub.mqtt_port, str(hub.ca_pem)) as again:
        connack = m.device_connect(again, hub.hostname, raw_id, raw_key, clean_session=False)
        assert m.connack_code(connack) == 0
        seen: list[tuple[str, bool, bytes]] = []
        deadline = time.monotonic() + 20
        while {s[0] for s in seen} < set(raw_sent):
            remaining = deadline - time.monotonic()
            assert remaining > 0, (
                f"after the restart got {[s[0] for s in seen]} of {raw_sent} "
                f"(in flight at the kill: {flight_ids})"
            )
            try:
                p = again.read_packet(remaining)
            except TimeoutError:
                continue
            if p.ptype != m.PUBLISH:
                continue
            topic, pid, payload = p.publish_parts()
            props = c2d_properties(topic, raw_id)
            seen.append((props.get("$.mid"), bool(p.flags & 0x08), payload))
            assert props.get("iothub-ack") == "full", props
            again.send(m.puback_packet(pid))
        order = [s[0] for s in seen]
        assert order == raw_sent, f"redelivered out of queue order or twice: {order}"
        for mid, dup, payload in seen:
            assert payload == f"body of {mid}".encode()
            if dup:
                assert mid in flight_ids, f"{mid} was never sent before the kill but came with DUP"
        # Acknowledged now: nothing comes again.
        more = again.drain(1.5)
        assert not [p for p in more if p.ptype == m.PUBLISH], more

    client, inbox = connect_receiver(device_client, hub, offline_id)
    msgs = inbox.wait_for(len(off_sent))
    assert [x.message_id for x in msgs] == off_sent
    assert [x.data for x in msgs] == [f"body of {mid}".encode() for mid in off_sent]
    assert inbox.quiet(len(off_sent), 1.0) == []
    reg = hub.registry()
    wait_until(lambda: reg.get_device(raw_id).cloud_to_device_message_count == 0, 10, what="raw queue empty")
    wait_until(
        lambda: reg.get_device(offline_id).cloud_to_device_message_count == 0, 10, what="offline queue empty"
    )


def test_every_accepted_send_survives_a_kill_during_a_burst(hub_factory, device_client):
    """Sends stream in while the hub is killed: every send the SDK returned from is delivered
    after the restart (sends caught by the kill may or may not be; none may be duplicated)."""
    hub = hub_factory(extra_args=("--c2d-max-queue-depth", "5000"))
    device_id = unique_id("durburst")
    hub.device_cs(device_id)
    rm = registry(hub)
    accepted: list[str] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def burst() -> None:
        i = 0
        while not stop.is_set():
            mid = f"burst-{i}"
            try:
                send_c2d(rm, device_id, mid, {"messageId": mid}, timeout=10)
            except SendTimeout as e:
                failure.append(e)
                return
            except Exception:  # noqa: BLE001 - the hub went away mid-send
                return
            accepted.append(mid)
            i += 1

    t = threading.Thread(target=burst, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while len(accepted) < 40 and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.02)
    hub.kill()
    stop.set()
    t.join(20)
    close_registry(rm)
    assert len(accepted) >= 40, (
        f"only {len(accepted)} sends accepted before the kill (thread alive: {t.is_alive()})"
    )
    hub.start()

    client, inbox = connect_receiver(device_client, hub, device_id)
    msgs = inbox.wait_for(len(accepted), timeout=40)
    time.sleep(1.0)
    got = [x.message_id for x in inbox.messages]
    assert got[: len(accepted)] == accepted, "accepted sends lost or reordered across the kill"
    extra = got[len(accepted) :]
    # At most the one send that was in the air at the kill, and only once.
    assert len(extra) <= 1 and len(set(got)) == len(got), f"unexpected after the accepted ones: {extra}"
    assert [x.data for x in msgs] == [mid.encode() for mid in accepted]
