"""Persistence across restarts: registry, twins, access policies and the dev PKI survive.

A graceful restart (SIGTERM) must keep everything; a SIGKILL must keep everything the hub
had acknowledged with a success status.
"""

from __future__ import annotations

import socket
import ssl

import pytest
from azure.iot.hub.models import Twin, TwinProperties

from harness import Hub, ServiceCredentials, random_key, unique_id


def _populate(rm, n: int = 3) -> dict[str, dict]:
    state: dict[str, dict] = {}
    for i in range(n):
        did = unique_id("persist")
        dev = rm.create_device_with_sas(
            did, random_key(), random_key(), "enabled" if i % 2 == 0 else "disabled"
        )
        twin = rm.update_twin(
            did,
            Twin(
                tags={"index": i, "site": "lab"},
                properties=TwinProperties(desired={"setpoint": 20 + i, "cfg": {"on": True}}),
            ),
        )
        state[did] = {"device": dev, "twin": twin}
    return state


def _assert_state_kept(rm, state: dict[str, dict]) -> None:
    for did, s in state.items():
        dev, twin = s["device"], s["twin"]
        got = rm.get_device(did)
        assert got.etag == dev.etag
        assert got.generation_id == dev.generation_id
        assert got.status == dev.status
        assert got.authentication.symmetric_key.primary_key == dev.authentication.symmetric_key.primary_key
        assert (
            got.authentication.symmetric_key.secondary_key == dev.authentication.symmetric_key.secondary_key
        )
        t = rm.get_twin(did)
        assert t.tags == twin.tags
        assert t.etag == twin.etag
        assert t.version == twin.version
        assert t.properties.desired["$version"] == twin.properties.desired["$version"]
        assert {k: v for k, v in t.properties.desired.items() if not k.startswith("$")} == {
            k: v for k, v in twin.properties.desired.items() if not k.startswith("$")
        }


def test_graceful_restart_keeps_everything(fresh_hub: Hub):
    hub = fresh_hub
    cs_before = {p: hub.service_cs(p) for p in ("iothubowner", "registryRead")}
    ca_before = hub.ca_pem.read_bytes()
    rm = hub.registry()
    state = _populate(rm)
    stats_before = rm.get_device_registry_statistics()

    assert hub.restart() == 0, "SIGTERM must exit 0"

    assert hub.ca_pem.read_bytes() == ca_before, "tls/ca.pem must be reused, byte for byte"
    # The connection strings printed before the restart still work...
    rm2 = hub.registry(cs=cs_before["iothubowner"])
    _assert_state_kept(rm2, state)
    reader = hub.registry(cs=cs_before["registryRead"])
    assert {d.device_id for d in reader.get_devices()} >= set(state)
    # ...and the CLI prints the same ones again.
    for policy, cs in cs_before.items():
        assert hub.connection_string_cli(policy) == cs
    after = rm2.get_device_registry_statistics()
    assert (after.total_device_count, after.enabled_device_count, after.disabled_device_count) == (
        stats_before.total_device_count,
        stats_before.enabled_device_count,
        stats_before.disabled_device_count,
    )


def _leaf_der(hub: Hub, port: int) -> bytes:
    ctx = ssl.create_default_context(cafile=str(hub.ca_pem))
    with socket.create_connection((hub.ip, port), timeout=10) as tcp:
        with ctx.wrap_socket(tcp, server_hostname=hub.ip) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der
    return der


@pytest.mark.parametrize("port_attr", ["https_port", "mqtt_port"])
def test_restart_reuses_server_certificate_and_bundle(fresh_hub: Hub, port_attr: str):
    hub = fresh_hub
    port = getattr(hub, port_attr)
    leaf_before = _leaf_der(hub, port)
    bundle_before = hub.ca_bundle.read_bytes()
    assert hub.restart() == 0
    assert _leaf_der(hub, port) == leaf_before, "the server certificate must be reused"
    assert hub.ca_bundle.read_bytes() == bundle_before


def test_sigkill_loses_nothing_acknowledged(fresh_hub: Hub):
    hub = fresh_hub
    cs = hub.service_cs()
    rm = hub.registry()
    state = _populate(rm, n=4)
    # The last write before the kill is the one most likely to sit in a buffer.
    last = unique_id("last")
    last_dev = rm.create_device_with_sas(last, None, None, "enabled")
    last_twin = rm.update_twin(last, Twin(tags={"final": True}))
    assert rm.recorder.last == 200

    hub.kill()
    hub.start()

    rm2 = hub.registry(cs=cs)
    _assert_state_kept(rm2, state)
    assert rm2.get_device(last).etag == last_dev.etag
    assert rm2.get_twin(last).tags == last_twin.tags
    assert ServiceCredentials.parse(hub.connection_string_cli()).key == ServiceCredentials.parse(cs).key


def test_deleted_device_stays_deleted_after_restart(fresh_hub: Hub):
    hub = fresh_hub
    rm = hub.registry()
    did = unique_id("gone")
    rm.create_device_with_sas(did, None, None, "enabled")
    rm.delete_device(did)
    assert rm.recorder.last == 204
    hub.restart()
    r = hub.rest("GET", f"/devices/{did}")
    assert r.status_code == 404, r.text
