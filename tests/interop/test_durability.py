"""A reported patch acknowledged with 204 survives an immediate SIGKILL of the hub.

The architecture promises the 204 only after the commit; these tests kill the hub the moment
the acknowledgement arrives, then read the twin back after a restart.
"""

from __future__ import annotations

import json
import urllib.parse

import pytest

import mqtt_raw as m
from harness import Hub, unique_id

pytestmark = pytest.mark.device


def test_acknowledged_reported_patch_survives_sigkill_raw(fresh_hub: Hub):
    hub = fresh_hub
    did = unique_id("dur")
    key = hub.device_key(did)
    acked: dict[str, int] = {}
    with m.RawMqtt(hub.ip, hub.mqtt_port, str(hub.ca_pem)) as conn:
        assert m.connack_code(m.device_connect(conn, hub.hostname, did, key)) == 0
        conn.send(m.subscribe_packet(1, [("$iothub/twin/res/#", 1)]))
        conn.wait_for(lambda p: p.ptype == m.SUBACK, timeout=10)
        for i in range(5):
            rid = f"dur-{i}"
            conn.send(
                m.publish_packet(
                    f"$iothub/twin/PATCH/properties/reported/?$rid={rid}",
                    json.dumps({f"k{i}": i, "last": i}).encode(),
                    qos=1,
                    pid=10 + i,
                )
            )
            res = conn.wait_for(
                lambda p, rid=rid: p.ptype == m.PUBLISH and f"rid={rid}" in p.publish_parts()[0], timeout=10
            )
            topic = res.publish_parts()[0]
            assert topic.startswith("$iothub/twin/res/204/"), topic
            acked[rid] = int(dict(urllib.parse.parse_qsl(topic.partition("?")[2]))["$version"])
        # Kill the instant the last 204 is in hand.
        hub.kill()

    hub.start()
    reported = hub.registry().get_twin(did).properties.reported
    assert reported["$version"] == acked["dur-4"]
    assert {f"k{i}": reported.get(f"k{i}") for i in range(5)} == {f"k{i}": i for i in range(5)}
    assert reported["last"] == 4


def test_acknowledged_reported_patch_survives_sigkill_sdk(fresh_hub: Hub, device_client):
    hub = fresh_hub
    did = unique_id("dur")
    client = device_client(hub.device_cs(did), connection_retry=False)
    client.connect()
    client.patch_twin_reported_properties({"firmware": "9.9.9"})  # returns once the 204 arrived
    hub.kill()
    hub.start()
    assert hub.registry().get_twin(did).properties.reported.get("firmware") == "9.9.9"
