"""MQTT/TLS with hand-built packets: what the hub must refuse, and how.

Each violation must close the connection (IoT Hub never answers a forbidden PUBLISH or
SUBSCRIBE with an error packet); CONNECT problems get the matching CONNACK code. Controls
next to the violations show the same connection works when the bytes are well formed.
"""

from __future__ import annotations

import json
import time
import urllib.parse

import pytest

import mqtt_raw as m
from harness import Hub, random_key, unique_id

pytestmark = pytest.mark.device

CONNECT_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def hub(module_hub_factory) -> Hub:
    # This module's hub closes connections that send no CONNECT within 2 s.
    return module_hub_factory(mqtt_connect_timeout=CONNECT_TIMEOUT_S)


@pytest.fixture
def raw(hub: Hub):
    conns: list[m.RawMqtt] = []

    def open_conn() -> m.RawMqtt:
        c = m.RawMqtt(hub.ip, hub.mqtt_port, str(hub.ca_pem))
        conns.append(c)
        return c

    yield open_conn
    for c in conns:
        c.close()


@pytest.fixture
def device(hub: Hub) -> tuple[str, str]:
    did = unique_id("raw")
    return did, hub.device_key(did)


def _connected(hub: Hub, raw, device, **kwargs) -> m.RawMqtt:
    did, key = device
    conn = raw()
    ack = m.device_connect(conn, hub.hostname, did, key, **kwargs)
    assert m.connack_code(ack) == 0, f"CONNACK {m.connack_code(ack)}"
    return conn


def _query(topic: str) -> dict[str, str]:
    _, _, q = topic.partition("?")
    return dict(urllib.parse.parse_qsl(q, keep_blank_values=True))


def _ping_ok(conn: m.RawMqtt) -> None:
    conn.send(m.PINGREQ_PACKET)
    conn.wait_for(lambda p: p.ptype == m.PINGRESP, timeout=5)


# ---- controls ------------------------------------------------------------------------------


def test_valid_connect_ping_and_twin_get(hub: Hub, raw, device):
    conn = _connected(hub, raw, device)
    _ping_ok(conn)
    # The hub answers a twin GET even before $iothub/twin/res/# is subscribed (the SDK relies on it).
    conn.send(m.publish_packet("$iothub/twin/GET/?$rid=get-1", b" ", qos=1, pid=1))
    res = conn.wait_for(lambda p: p.ptype == m.PUBLISH and "rid=get-1" in p.publish_parts()[0], timeout=10)
    topic, _, payload = res.publish_parts()
    assert topic.startswith("$iothub/twin/res/200/"), topic
    doc = json.loads(payload)
    assert isinstance(doc["desired"]["$version"], int) and isinstance(doc["reported"]["$version"], int)


def test_publish_below_size_limit_is_accepted(hub: Hub, raw, device):
    did, _ = device
    conn = _connected(hub, raw, device)
    conn.send(m.publish_packet(f"devices/{did}/messages/events/", b"y" * (200 * 1024), qos=1, pid=3))
    ack = conn.wait_for(lambda p: p.ptype == m.PUBACK, timeout=10)
    assert ack.packet_id() == 3
    _ping_ok(conn)


# ---- violations that close the connection --------------------------------------------------


def test_publish_to_another_devices_topic_closes(hub: Hub, raw, device):
    other = unique_id("other")
    hub.device_key(other)
    conn = _connected(hub, raw, device)
    try:
        conn.send(m.publish_packet(f"devices/{other}/messages/events/", b"spoof", qos=1, pid=7))
    except m.Closed:
        return
    _, seen = conn.expect_closed(within=5)
    assert not any(p.ptype == m.PUBACK for p in seen), f"spoofed publish was acknowledged: {seen}"


def test_subscribe_to_hash_closes(hub: Hub, raw, device):
    conn = _connected(hub, raw, device)
    conn.send(m.subscribe_packet(1, [("#", 1)]))
    _, seen = conn.expect_closed(within=5)
    granted = [p for p in seen if p.ptype == m.SUBACK and p.body[2:] != b"\x80"]
    assert not granted, f"'#' was granted: {seen}"


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x00, 0x00]),  # packet type 0 is reserved
        bytes([0xF0, 0x00]),  # packet type 15 is reserved
        bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),  # remaining length longer than 4 bytes
        m.subscribe_packet(1, [("$iothub/methods/POST/#", 1)], flags=0),  # SUBSCRIBE flags must be 2
        bytes([0x30, 0x05, 0x00, 0x09, 0x61, 0x62, 0x63]),  # topic length beyond the packet
        bytes([0x30, 0x05, 0x00, 0x02, 0xC3, 0x28, 0x00]),  # topic that is not UTF-8
        m.connect_packet("again", "u", "p"),  # a second CONNECT
    ],
    ids=[
        "type0",
        "type15",
        "varint-5-bytes",
        "subscribe-bad-flags",
        "topic-overrun",
        "bad-utf8",
        "second-connect",
    ],
)
def test_malformed_packet_closes(hub: Hub, raw, device, data):
    conn = _connected(hub, raw, device)
    try:
        conn.send(data)
    except m.Closed:
        return
    conn.expect_closed(within=5)


def test_qos2_publish_closes(hub: Hub, raw, device):
    did, _ = device
    conn = _connected(hub, raw, device)
    conn.send(m.publish_packet(f"devices/{did}/messages/events/", b"qos2", qos=2, pid=9))
    _, seen = conn.expect_closed(within=5)
    assert not any(p.ptype == m.PUBREC for p in seen), f"QoS 2 was accepted: {seen}"


def test_packet_over_256_kib_closes(hub: Hub, raw, device):
    did, _ = device
    conn = _connected(hub, raw, device)
    try:
        conn.send(m.publish_packet(f"devices/{did}/messages/events/", b"z" * (300 * 1024), qos=1, pid=4))
    except m.Closed:
        return
    _, seen = conn.expect_closed(within=10)
    assert not any(p.ptype == m.PUBACK for p in seen), f"oversized publish was acknowledged: {seen}"


def test_silence_past_keepalive_closes(hub: Hub, raw, device):
    conn = _connected(hub, raw, device, keepalive=2)
    connack_at = time.monotonic()
    closed_at, _ = conn.expect_closed(within=8)
    elapsed = closed_at - connack_at
    # MQTT allows 1.5 x keepalive = 3 s; give scheduling some slack on either side.
    assert 2.0 <= elapsed <= 4.5, f"closed {elapsed:.2f}s after CONNACK with keepalive 2s"


def test_pings_within_keepalive_keep_the_connection(hub: Hub, raw, device):
    conn = _connected(hub, raw, device, keepalive=2)
    for _ in range(6):
        time.sleep(1)
        _ping_ok(conn)
    assert not conn.closed


def test_no_connect_within_timeout_closes(hub: Hub, raw):
    conn = raw()
    closed_at, seen = conn.expect_closed(within=CONNECT_TIMEOUT_S + 6)
    assert not seen, f"server sent packets without a CONNECT: {seen}"
    since_tcp = closed_at - conn.connected_at
    since_tls = closed_at - conn.handshake_done_at
    assert since_tcp >= CONNECT_TIMEOUT_S - 0.5, f"closed after {since_tcp:.2f}s, before the timeout"
    assert since_tls <= CONNECT_TIMEOUT_S + 2.0, f"closed {since_tls:.2f}s after the handshake"


# ---- CONNECT refusals ------------------------------------------------------------------------


def _refused(conn: m.RawMqtt, ack: m.Packet, code: int) -> None:
    assert m.connack_code(ack) == code, f"CONNACK {m.connack_code(ack)}, expected {code}"
    assert ack.body[0] == 0, "session-present must be 0 on a refused CONNECT"
    conn.expect_closed(within=5)


@pytest.mark.parametrize("case", ["wrong-key", "expired"])
def test_bad_sas_gets_connack_5(hub: Hub, raw, device, case):
    did, key = device
    conn = raw()
    if case == "wrong-key":
        ack = m.device_connect(conn, hub.hostname, did, random_key())
    else:
        ack = m.device_connect(conn, hub.hostname, did, key, se=int(time.time()) - 60)
    _refused(conn, ack, 5)


def test_unknown_device_gets_connack_5(hub: Hub, raw):
    conn = raw()
    ack = m.device_connect(conn, hub.hostname, unique_id("ghost"), random_key())
    _refused(conn, ack, 5)


def test_protocol_level_3_gets_connack_1(hub: Hub, raw, device):
    did, key = device
    conn = raw()
    ack = m.device_connect(conn, hub.hostname, did, key, level=3)
    _refused(conn, ack, 1)


def test_client_id_not_matching_username_gets_connack_2(hub: Hub, raw, device):
    did, key = device
    conn = raw()
    ack = m.device_connect(conn, hub.hostname, did, key, client_id=did + "-other")
    _refused(conn, ack, 2)


# ---- QoS 1 duplicates --------------------------------------------------------------------------


def test_duplicate_reported_patch_is_applied_once(hub: Hub, raw, device):
    did, _ = device
    rm = hub.registry()
    before = rm.get_twin(did).properties.reported["$version"]
    conn = _connected(hub, raw, device)
    conn.send(m.subscribe_packet(1, [("$iothub/twin/res/#", 1)]))
    conn.wait_for(lambda p: p.ptype == m.SUBACK, timeout=10)

    topic = "$iothub/twin/PATCH/properties/reported/?$rid=dup-rid-1"
    conn.send(m.publish_packet(topic, b'{"counter": 1}', qos=1, pid=21))
    conn.send(m.publish_packet(topic, b'{"counter": 1}', qos=1, pid=21, dup=True))
    seen = conn.drain(3)

    answers = [
        p for p in seen if p.ptype == m.PUBLISH and _query(p.publish_parts()[0]).get("$rid") == "dup-rid-1"
    ]
    assert len(answers) == 1, f"expected one twin response, got {[a.publish_parts()[0] for a in answers]}"
    answer_topic = answers[0].publish_parts()[0]
    assert answer_topic.startswith("$iothub/twin/res/204/"), answer_topic
    assert int(_query(answer_topic)["$version"]) == before + 1, answer_topic
    assert any(p.ptype == m.PUBACK and p.packet_id() == 21 for p in seen), f"no PUBACK for pid 21: {seen}"

    reported = rm.get_twin(did).properties.reported
    assert reported["$version"] == before + 1, "the duplicate bumped $version again"
    assert reported["counter"] == 1
