"""Twins seen from the device SDK: desired-patch notifications, get_twin, reported patches."""

from __future__ import annotations

import queue

import pytest
from azure.iot.hub.models import Twin, TwinProperties

from harness import Hub, unique_id

pytestmark = pytest.mark.device

TRANSPORTS = ["mqtt", "websockets"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_desired_patch_reaches_device_with_version(hub: Hub, device_client, transport):
    did = unique_id("tw")
    client = device_client(hub.device_cs(did), websockets=transport == "websockets")
    patches: queue.Queue = queue.Queue()
    client.connect()
    client.on_twin_desired_properties_patch_received = patches.put  # subscribes before returning

    rm = hub.registry()
    t1 = rm.update_twin(did, Twin(properties=TwinProperties(desired={"fan": "on", "speed": 3})))
    patch = patches.get(timeout=15)
    assert patch["$version"] == t1.properties.desired["$version"]
    assert patch["fan"] == "on" and patch["speed"] == 3

    # Deleting a key arrives as null; each patch carries the new $version.
    t2 = rm.update_twin(did, Twin(properties=TwinProperties(desired={"fan": None})))
    patch = patches.get(timeout=15)
    assert patch["$version"] == t2.properties.desired["$version"] == t1.properties.desired["$version"] + 1
    assert "fan" in patch and patch["fan"] is None

    # Tags are service-only: a tags patch must not notify the device.
    rm.update_twin(did, Twin(tags={"secret": "x"}))
    with pytest.raises(queue.Empty):
        patches.get(timeout=2)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_device_get_twin_and_reported_patch(hub: Hub, device_client, transport):
    did = unique_id("tw")
    rm = hub.registry()
    client = device_client(hub.device_cs(did), websockets=transport == "websockets")
    svc = rm.update_twin(did, Twin(tags={"t": 1}, properties=TwinProperties(desired={"interval": 30})))
    client.connect()

    twin = client.get_twin()
    assert set(twin) >= {"desired", "reported"}
    assert "tags" not in twin, "the device-side twin never shows tags"
    assert twin["desired"]["interval"] == 30
    assert twin["desired"]["$version"] == svc.properties.desired["$version"]
    r0 = twin["reported"]["$version"]
    assert isinstance(r0, int)

    client.patch_twin_reported_properties({"firmware": "1.2.3", "battery": {"level": 88}})
    client.patch_twin_reported_properties({"battery": {"charging": True}})
    twin = client.get_twin()
    assert twin["reported"]["$version"] == r0 + 2
    assert twin["reported"]["firmware"] == "1.2.3"
    assert twin["reported"]["battery"] == {"level": 88, "charging": True}

    client.patch_twin_reported_properties({"firmware": None})
    seen = rm.get_twin(did).properties.reported
    assert "firmware" not in seen
    assert seen["battery"] == {"level": 88, "charging": True}
    assert seen["$version"] == r0 + 3


def test_invalid_reported_patch_is_rejected(hub: Hub, device_client):
    from azure.iot.device.exceptions import ClientError

    did = unique_id("tw")
    client = device_client(hub.device_cs(did))
    client.connect()
    before = client.get_twin()["reported"]["$version"]
    with pytest.raises(ClientError) as info:
        client.patch_twin_reported_properties({"bad.key": 1})
    assert "400" in str(info.value.__cause__), repr(info.value.__cause__)
    assert client.get_twin()["reported"]["$version"] == before
