"""Module identities with the official Python SDKs, unchanged (issue 13, everything but X.509
sign-in).

Service side: azure-iot-hub 2.7.0's IoTHubRegistryManager module calls (create with SAS, X.509
thumbprints or CA, update with an etag or "*", get, list, delete, module twins, module methods,
`FROM devices.modules` queries) and the errors it raises (404010, 409301, 404001, 412).
Device side: azure-iot-device 2.14.0's IoTHubModuleClient from a module connection string
(`HostName=..;DeviceId=..;ModuleId=..;SharedAccessKey=..`) over MQTT/TLS and MQTT over
WebSockets: methods, twin reported and desired, telemetry and output messages read back from
the Event Hub-compatible endpoint with azure-eventhub. Token boundaries: a module's token never
signs in as its device or another module, a device's never as its module (through the SDK and
with hand-built CONNECTs, which can pair any token with any client id), and the topic ACL
keeps each session to its own identity's topics. The Node.js service SDK (azure-iothub 1.16.6,
node/modules_service.mjs) does the registry calls and invokeDeviceMethod(device, module, ..).

One hub serves the whole file (the restart test has its own); every test works on devices of
its own.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import time
import urllib.parse
from typing import Any, Callable, Iterator

import pytest
import requests
from azure.iot.hub.models import CloudToDeviceMethod, QuerySpecification, Twin, TwinProperties
from msrest.exceptions import HttpOperationError

import harness
import mqtt_raw as m
from harness import (
    Hub,
    assert_iothub_error,
    device_sas,
    random_key,
    sdk_call,
    shutdown_bounded,
    sign,
    unique_id,
    wait_until,
)
from routelib import StreamReader, props, sysprops, text

pytestmark = pytest.mark.device

TRANSPORTS = ["mqtt", "websockets"]
CONNECT_REFUSAL_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _status(rm) -> int:
    return rm.recorder.last


def _thumbprint() -> str:
    return os.urandom(20).hex().upper()


def new_device(rm, prefix: str = "mdev") -> str:
    did = unique_id(prefix)
    sdk_call(rm.create_device_with_sas, did, None, None, "enabled")
    return did


def new_module(rm, did: str, mid: str | None = None, managed_by: str | None = None):
    """A SAS module with hub-generated keys; returns the Module."""
    return sdk_call(rm.create_module_with_sas, did, mid or unique_id("mod"), managed_by, None, None)


def module_cs(hub: Hub, did: str, mid: str, key: str) -> str:
    return f"HostName={hub.hostname};DeviceId={did};ModuleId={mid};SharedAccessKey={key}"


def module_key(module) -> str:
    key = module.authentication.symmetric_key.primary_key
    assert key, f"module has no primary key: {module.as_dict()}"
    return key


def module_sas(host: str, did: str, mid: str, key_b64: str, se: int) -> str:
    """A module token as azure-iot-device builds it (harness.device_sas for a device)."""
    sr = urllib.parse.quote(f"{host}/devices/{did}/modules/{mid}", safe="")
    sig = urllib.parse.quote(sign(key_b64, f"{sr}\n{se}"), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}"


def answering(client, calls: list, status: int = 200, tag: str = "") -> None:
    """Answers every method request with `status` and {"by": tag, "name", "payload"}."""
    from azure.iot.device import MethodResponse

    def handler(request) -> None:
        calls.append(request)
        client.send_method_response(
            MethodResponse.create_from_method_request(
                request, status, {"by": tag, "name": request.name, "payload": request.payload}
            )
        )

    client.on_method_request_received = handler


def invoke_module(rm, did: str, mid: str, name: str = "ping", payload: Any = None, **kwargs: Any):
    return rm.invoke_device_module_method(
        did, mid, CloudToDeviceMethod(method_name=name, payload=payload, **kwargs)
    )




def connect_refused(client) -> BaseException:
    return harness.connect_refused(client, CONNECT_REFUSAL_TIMEOUT_S)


@pytest.fixture
def module_client_factory() -> Iterator[Callable[[Hub], Callable[..., Any]]]:
    """module_client_factory(hub)(cs, **kwargs): IoTHubModuleClient from a module connection
    string, trusting that hub's CA through the SDK's own server_verification_cert; all are
    shut down at teardown."""
    from azure.iot.device import IoTHubModuleClient

    clients: list[Any] = []

    def for_hub(hub: Hub) -> Callable[..., Any]:
        ca = hub.ca_pem.read_text()

        def make(cs: str, **kwargs: Any) -> Any:
            kwargs.setdefault("server_verification_cert", ca)
            client = IoTHubModuleClient.create_from_connection_string(cs, **kwargs)
            clients.append(client)
            return client

        return make

    yield for_hub
    for client in clients:
        shutdown_bounded(client)


@pytest.fixture
def module_client(hub: Hub, module_client_factory) -> Callable[..., Any]:
    """Module clients of the file's hub."""
    return module_client_factory(hub)


# --------------------------------------------------------------------------------------------
# Registry: create, update, get, list, delete
# --------------------------------------------------------------------------------------------


def test_create_module_with_sas_keeps_given_keys(rm, hub: Hub):
    did = new_device(rm)
    mid, pk, sk = unique_id("mod"), random_key(), random_key()
    mod = rm.create_module_with_sas(did, mid, "edgeAgent", pk, sk)
    method, url, status = rm.recorder.last_call()
    assert method == "PUT" and f"/devices/{did}/modules/{mid}" in url
    assert status in (200, 201)
    assert mod.device_id == did and mod.module_id == mid
    assert mod.managed_by == "edgeAgent"
    assert mod.authentication.type == "sas"
    assert mod.authentication.symmetric_key.primary_key == pk
    assert mod.authentication.symmetric_key.secondary_key == sk
    assert mod.etag and mod.generation_id
    assert mod.connection_state == "Disconnected"

    # The JSON itself, as the other SDKs read it.
    r = hub.rest("GET", f"/devices/{did}/modules/{mid}")
    assert r.status_code == 200, r.text
    body = r.json()
    for key in (
        "moduleId",
        "deviceId",
        "managedBy",
        "generationId",
        "etag",
        "connectionState",
        "connectionStateUpdatedTime",
        "lastActivityTime",
        "cloudToDeviceMessageCount",
        "authentication",
    ):
        assert key in body, f"Module JSON lacks {key}: {body}"
    assert body["moduleId"] == mid and body["deviceId"] == did
    assert body["authentication"]["type"] == "sas"
    assert body["authentication"]["symmetricKey"] == {"primaryKey": pk, "secondaryKey": sk}


def test_create_module_with_sas_none_keys_generates_keys(rm):
    did = new_device(rm)
    mid = unique_id("mod")
    mod = rm.create_module_with_sas(did, mid, None, None, None)
    assert _status(rm) in (200, 201)
    pk = mod.authentication.symmetric_key.primary_key
    sk = mod.authentication.symmetric_key.secondary_key
    assert pk and sk and pk != sk
    for key in (pk, sk):
        assert 16 <= len(base64.b64decode(key, validate=True)) <= 64
    assert mod.managed_by in (None, ""), "managedBy was not given"
    device = rm.get_device(did)
    assert pk != device.authentication.symmetric_key.primary_key, "a module has keys of its own"
    again = rm.get_module(did, mid)
    assert again.authentication.symmetric_key.primary_key == pk, "generated keys must be stored"
    assert again.etag == mod.etag and again.generation_id == mod.generation_id


def test_create_module_with_x509_and_certificate_authority(rm):
    did = new_device(rm)
    p, s = _thumbprint(), _thumbprint()
    m1 = rm.create_module_with_x509(did, "thumbs", None, p, s)
    assert _status(rm) in (200, 201)
    assert m1.authentication.type == "selfSigned"
    assert m1.authentication.x509_thumbprint.primary_thumbprint == p
    assert m1.authentication.x509_thumbprint.secondary_thumbprint == s
    got = rm.get_module(did, "thumbs")
    assert got.authentication.type == "selfSigned"
    assert got.authentication.x509_thumbprint.primary_thumbprint == p

    m2 = rm.create_module_with_certificate_authority(did, "ca", "someone")
    assert _status(rm) in (200, 201)
    assert m2.authentication.type == "certificateAuthority"
    assert m2.managed_by == "someone"
    assert rm.get_module(did, "ca").authentication.type == "certificateAuthority"


@pytest.mark.parametrize("etag_mode", ["real-etag", "star"])
def test_update_module_with_sas(rm, etag_mode):
    did = new_device(rm)
    created = new_module(rm, did)
    mid = created.module_id
    pk, sk = random_key(), random_key()
    etag = created.etag if etag_mode == "real-etag" else None  # None: the SDK sends "*"
    updated = rm.update_module_with_sas(did, mid, "newManager", etag, pk, sk)
    method, _url, status = rm.recorder.last_call()
    assert method == "PUT" and status in (200, 201)
    assert updated.authentication.symmetric_key.primary_key == pk
    assert updated.authentication.symmetric_key.secondary_key == sk
    assert updated.managed_by == "newManager"
    assert updated.etag and updated.etag != created.etag, "an update must change the etag"
    assert updated.generation_id == created.generation_id, "generationId is immutable"
    got = rm.get_module(did, mid)
    assert got.etag == updated.etag
    assert got.authentication.symmetric_key.primary_key == pk


def test_update_module_with_stale_etag_is_412(rm):
    did = new_device(rm)
    created = new_module(rm, did)
    mid = created.module_id
    sdk_call(rm.update_module_with_sas, did, mid, None, created.etag, random_key(), random_key())
    with pytest.raises(HttpOperationError) as info:
        rm.update_module_with_sas(did, mid, None, created.etag, random_key(), random_key())
    assert_iothub_error(info.value.response, 412)
    with pytest.raises(HttpOperationError) as info:
        rm.delete_module(did, mid, created.etag)
    assert_iothub_error(info.value.response, 412)
    assert rm.get_module(did, mid).module_id == mid, "a refused delete must keep the module"


def test_update_of_a_missing_module_is_404010(rm):
    did = new_device(rm)
    with pytest.raises(HttpOperationError) as info:
        rm.update_module_with_sas(did, "nosuch", None, None, random_key(), random_key())
    assert_iothub_error(info.value.response, 404, 404010, "ModuleNotFound")


def test_get_modules_lists_the_devices_modules(rm):
    did = new_device(rm)
    other = new_device(rm)
    new_module(rm, other, "elsewhere")
    assert rm.get_modules(did) == [] and _status(rm) == 200
    mids = {"alpha", "beta", "gamma"}
    for mid in mids:
        new_module(rm, did, mid)
    listed = rm.get_modules(did)
    assert rm.recorder.last_call()[0] == "GET" and _status(rm) == 200
    assert {x.module_id for x in listed} == mids
    assert all(x.device_id == did for x in listed)
    assert all(x.authentication.type == "sas" for x in listed)
    with pytest.raises(HttpOperationError) as info:
        rm.get_modules(unique_id("ghost"))
    assert_iothub_error(info.value.response, 404, 404001, "DeviceNotFound")

    # Module ids are case-sensitive: "Alpha" is another module than "alpha".
    upper = new_module(rm, did, "Alpha")
    assert upper.etag != rm.get_module(did, "alpha").etag
    assert {x.module_id for x in rm.get_modules(did)} == mids | {"Alpha"}


def test_delete_module_answers_204_then_404010(rm):
    did = new_device(rm)
    mod = new_module(rm, did)
    mid = mod.module_id
    assert rm.delete_module(did, mid, mod.etag) is None
    assert rm.recorder.last_call()[0] == "DELETE" and _status(rm) == 204
    with pytest.raises(HttpOperationError) as info:
        rm.get_module(did, mid)
    assert_iothub_error(info.value.response, 404, 404010, "ModuleNotFound")
    with pytest.raises(HttpOperationError) as info:
        rm.get_module_twin(did, mid)
    assert info.value.response.status_code == 404, "deleting a module must delete its twin"
    with pytest.raises(HttpOperationError) as info:
        rm.delete_module(did, mid)
    assert_iothub_error(info.value.response, 404, 404010, "ModuleNotFound")
    assert rm.get_device(did).device_id == did, "the device stays"

    # Without an etag (the SDK sends "*").
    mod2 = new_module(rm, did)
    rm.delete_module(did, mod2.module_id)
    assert _status(rm) == 204
    again = new_module(rm, did, mod2.module_id)
    assert again.generation_id != mod2.generation_id, "a recreated module gets a new generation"


def test_duplicate_module_is_409301(rm):
    did = new_device(rm)
    mod = new_module(rm, did)
    with pytest.raises(HttpOperationError) as info:
        rm.create_module_with_sas(did, mod.module_id, None, None, None)
    assert_iothub_error(info.value.response, 409, 409301, "ModuleAlreadyExistsOnDevice")
    assert rm.get_module(did, mod.module_id).etag == mod.etag, "the refused create changed nothing"
    # The same module id under another device is another identity.
    other = new_device(rm)
    assert new_module(rm, other, mod.module_id).device_id == other


def test_module_of_a_missing_device_is_404001(rm):
    ghost = unique_id("ghost")
    with pytest.raises(HttpOperationError) as info:
        rm.create_module_with_sas(ghost, "m1", None, None, None)
    assert_iothub_error(info.value.response, 404, 404001, "DeviceNotFound")
    with pytest.raises(HttpOperationError) as info:
        rm.get_module(ghost, "m1")
    assert info.value.response.status_code == 404
    with pytest.raises(HttpOperationError) as info:
        rm.get_module_twin(ghost, "m1")
    assert info.value.response.status_code == 404


def test_deleting_the_device_deletes_its_modules(hub: Hub, rm, module_client):
    did = new_device(rm)
    mods = [new_module(rm, did) for _ in range(2)]
    sdk_call(rm.update_module_twin, did, mods[0].module_id, Twin(tags={"t": 1}))
    connected = module_client(
        module_cs(hub, did, mods[1].module_id, module_key(mods[1])), connection_retry=False
    )
    connected.connect()
    rm.delete_device(did)
    assert _status(rm) == 204
    wait_until(lambda: not connected.connected, timeout=10, what="the deleted device's module dropped")
    for mod in mods:
        with pytest.raises(HttpOperationError) as info:
            rm.get_module(did, mod.module_id)
        assert info.value.response.status_code == 404
        with pytest.raises(HttpOperationError) as info:
            rm.get_module_twin(did, mod.module_id)
        assert info.value.response.status_code == 404
    # A device created again under the same id starts with no modules.
    sdk_call(rm.create_device_with_sas, did, None, None, "enabled")
    assert rm.get_modules(did) == []
    again = new_module(rm, did, mods[0].module_id)
    assert again.generation_id != mods[0].generation_id
    assert rm.get_module_twin(did, mods[0].module_id).tags in (None, {}), "an old twin came back"


def test_a_bulk_entry_naming_a_module_never_touches_its_device(rm):
    """ExportImportDevice has a module_id; twinhub's bulk registry call serves devices only, so
    such an entry fails on its own (before, a module "delete" deleted the whole device)."""
    from azure.iot.hub.models import ExportImportDevice

    did = new_device(rm)
    mod = new_module(rm, did)
    res = rm.bulk_create_or_update_devices(
        [ExportImportDevice(id=did, module_id=mod.module_id, import_mode="delete")]
    )
    assert _status(rm) == 400
    assert res.is_successful is False, res.as_dict()
    assert [(e.device_id, e.module_id) for e in res.errors] == [(did, mod.module_id)], res.as_dict()
    assert rm.get_device(did).device_id == did
    assert rm.get_module(did, mod.module_id).etag == mod.etag


def test_module_ids_are_validated(rm, hub: Hub):
    """A space is not allowed in a module id, nor more than 128 characters, and the body may
    not name another module than the path (all 400)."""
    did = new_device(rm)
    r = hub.rest(
        "PUT",
        f"/devices/{did}/modules/bad%20id",
        json_body={"moduleId": "bad id", "deviceId": did, "authentication": {"type": "sas"}},
    )
    assert_iothub_error(r, 400)
    r = hub.rest(
        "PUT",
        f"/devices/{did}/modules/m1",
        json_body={"moduleId": "m2", "deviceId": did, "authentication": {"type": "sas"}},
    )
    assert_iothub_error(r, 400)
    # At most 128 characters.
    assert new_module(rm, did, "a" * 128).module_id == "a" * 128
    with pytest.raises(HttpOperationError) as info:
        rm.create_module_with_sas(did, "a" * 129, None, None, None)
    assert_iothub_error(info.value.response, 400)


# --------------------------------------------------------------------------------------------
# Module twins and methods through the service SDK
# --------------------------------------------------------------------------------------------


def test_module_twin_get_update_replace(rm, hub: Hub):
    did = new_device(rm)
    mid = new_module(rm, did).module_id
    twin = rm.get_module_twin(did, mid)
    assert _status(rm) == 200
    assert twin.device_id == did and twin.module_id == mid
    assert twin.etag and isinstance(twin.version, int)
    assert twin.properties.desired["$version"] >= 1
    assert twin.properties.reported["$version"] >= 1

    r = hub.rest("GET", f"/twins/{did}/modules/{mid}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["moduleId"] == mid and body["deviceId"] == did
    for key in ("etag", "deviceEtag", "status", "connectionState", "authenticationType", "version"):
        assert key in body, f"module twin JSON lacks {key}: {body}"
    # Device-only fields: IoT Hub's module twins carry no capabilities or scopes.
    assert "capabilities" not in body and "parentScopes" not in body, body

    t1 = rm.update_module_twin(
        did, mid, Twin(tags={"site": "a"}, properties=TwinProperties(desired={"rate": 5})), twin.etag
    )
    method, url, status = rm.recorder.last_call()
    assert (method, status) == ("PATCH", 200) and f"/twins/{did}/modules/{mid}" in url
    assert t1.tags == {"site": "a"}
    assert t1.properties.desired["rate"] == 5
    assert t1.properties.desired["$version"] == twin.properties.desired["$version"] + 1
    assert t1.etag != twin.etag

    # A stale etag is refused, "*" (etag None) is not.
    with pytest.raises(HttpOperationError) as info:
        rm.update_module_twin(did, mid, Twin(tags={"x": 1}), twin.etag)
    assert_iothub_error(info.value.response, 412)
    t2 = rm.update_module_twin(did, mid, Twin(tags={"more": True}))
    assert t2.tags == {"site": "a", "more": True}

    t3 = rm.replace_module_twin(
        did, mid, Twin(tags={"only": 1}, properties=TwinProperties(desired={"mode": "x"})), t2.etag
    )
    method, _url, status = rm.recorder.last_call()
    assert (method, status) == ("PUT", 200)
    assert t3.tags == {"only": 1}
    assert "rate" not in t3.properties.desired and t3.properties.desired["mode"] == "x"
    with pytest.raises(HttpOperationError) as info:
        rm.replace_module_twin(did, mid, Twin(tags={}), t2.etag)
    assert_iothub_error(info.value.response, 412)

    # The device's own twin is another document.
    dev_twin = rm.get_twin(did)
    assert not dev_twin.tags
    assert "mode" not in dev_twin.properties.desired
    assert getattr(dev_twin, "module_id", None) in (None, "")


def test_module_twin_of_a_missing_module_is_404010(rm):
    did = new_device(rm)
    for call in (
        lambda: rm.get_module_twin(did, "nosuch"),
        lambda: rm.update_module_twin(did, "nosuch", Twin(tags={"a": 1})),
        lambda: rm.replace_module_twin(did, "nosuch", Twin(tags={"a": 1})),
        lambda: invoke_module(rm, did, "nosuch"),
    ):
        with pytest.raises(HttpOperationError) as info:
            call()
        assert_iothub_error(info.value.response, 404, 404010, "ModuleNotFound")


def test_method_on_an_offline_module_is_404103(rm):
    did = new_device(rm)
    mid = new_module(rm, did).module_id
    with pytest.raises(HttpOperationError) as info:
        invoke_module(rm, did, mid)
    assert_iothub_error(info.value.response, 404, 404103, "DeviceNotOnline")


# --------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------


def _query(rm, q: str) -> list:
    res = sdk_call(rm.query_iot_hub, QuerySpecification(query=q))
    return res.items


def test_query_devices_modules(hub: Hub, rm, module_client):
    did = new_device(rm, "mq")
    mods = [new_module(rm, did, mid) for mid in ("qa", "qb", "qc")]
    marker = unique_id("fw")
    sdk_call(rm.update_module_twin, did, "qb", Twin(tags={"marker": marker}))

    items = _query(rm, f"SELECT * FROM devices.modules WHERE deviceId = '{did}'")
    assert sorted(t.module_id for t in items) == ["qa", "qb", "qc"]
    assert all(t.device_id == did for t in items)
    assert all(t.etag for t in items)

    items = _query(rm, f"SELECT * FROM devices.modules WHERE deviceId = '{did}' AND moduleId = 'qa'")
    assert [(t.device_id, t.module_id) for t in items] == [(did, "qa")]

    items = _query(rm, f"SELECT * FROM devices.modules WHERE tags.marker = '{marker}'")
    assert [(t.device_id, t.module_id) for t in items] == [(did, "qb")]

    # A reported property, written by the module itself.
    client = module_client(module_cs(hub, did, "qc", module_key(mods[2])))
    client.connect()
    client.patch_twin_reported_properties({"fw": marker})
    items = _query(rm, f"SELECT * FROM devices.modules WHERE properties.reported.fw = '{marker}'")
    assert [(t.device_id, t.module_id) for t in items] == [(did, "qc")]
    assert items[0].properties.reported["fw"] == marker

    # FROM devices never returns modules.
    items = _query(rm, f"SELECT * FROM devices WHERE deviceId = '{did}'")
    assert [t.device_id for t in items] == [did]
    assert all(getattr(t, "module_id", None) in (None, "") for t in items)


def test_query_modules_projection_count_and_paging(rm):
    did = new_device(rm, "mqp")
    for i in range(5):
        new_module(rm, did, f"p{i}")
    items = _query(rm, f"SELECT deviceId, moduleId FROM devices.modules WHERE deviceId = '{did}'")
    got = sorted((t.device_id, t.module_id) for t in items)
    assert got == [(did, f"p{i}") for i in range(5)]

    items = _query(rm, f"SELECT COUNT() AS n FROM devices.modules WHERE deviceId = '{did}'")
    assert len(items) == 1
    counted = items[0].additional_properties.get("n") if items[0].additional_properties else None
    assert counted == 5, items[0].as_dict()

    seen: list[str] = []
    token = None
    for _ in range(10):
        res = sdk_call(
            rm.query_iot_hub,
            QuerySpecification(query=f"SELECT * FROM devices.modules WHERE deviceId = '{did}'"),
            token,
            2,
        )
        assert len(res.items) <= 2
        seen += [t.module_id for t in res.items]
        token = res.continuation_token
        if not token:
            break
    assert sorted(seen) == [f"p{i}" for i in range(5)], seen


def test_module_connection_state_in_queries(hub: Hub, rm, module_client):
    did = new_device(rm, "mqc")
    mods = [new_module(rm, did, mid) for mid in ("on", "off")]
    client = module_client(module_cs(hub, did, "on", module_key(mods[0])))
    client.connect()
    items = _query(
        rm, f"SELECT * FROM devices.modules WHERE deviceId = '{did}' AND connectionState = 'Connected'"
    )
    assert [t.module_id for t in items] == ["on"]
    assert items[0].connection_state == "Connected"


# --------------------------------------------------------------------------------------------
# IoTHubModuleClient: methods, twins, telemetry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_module_client_methods_and_twin(hub: Hub, rm, module_client, transport):
    did = new_device(rm)
    mod = new_module(rm, did)
    mid = mod.module_id
    client = module_client(module_cs(hub, did, mid, module_key(mod)), websockets=transport == "websockets")
    client.connect()
    live = rm.get_module(did, mid)
    assert live.connection_state == "Connected"
    assert live.connection_state_updated_time.year >= 2024, live.as_dict()
    assert rm.get_device(did).connection_state == "Disconnected", "the device itself is not connected"

    # A direct method to the module.
    calls: list = []
    answering(client, calls, status=201, tag="module")
    res = sdk_call(invoke_module, rm, did, mid, "reboot", {"delay": 3})
    assert res.status == 201
    assert res.payload == {"by": "module", "name": "reboot", "payload": {"delay": 3}}
    assert [c.name for c in calls] == ["reboot"]

    # The device-side twin: no tags, reported and desired with versions.
    twin = client.get_twin()
    assert set(twin) >= {"desired", "reported"} and "tags" not in twin
    r0 = twin["reported"]["$version"]

    # Reported patch, seen by the service.
    client.patch_twin_reported_properties({"status": "running", "stats": {"uptime": 12}})
    seen = rm.get_module_twin(did, mid).properties.reported
    assert seen["status"] == "running" and seen["stats"] == {"uptime": 12}
    assert seen["$version"] == r0 + 1
    assert "status" not in rm.get_twin(did).properties.reported, "a module's report reached the device twin"

    # Desired patch from update_module_twin, received by the module with its version.
    patches: queue.Queue = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    t1 = sdk_call(rm.update_module_twin, did, mid, Twin(properties=TwinProperties(desired={"rate": 7})))
    patch = patches.get(timeout=15)
    assert patch["rate"] == 7
    assert patch["$version"] == t1.properties.desired["$version"]
    # replace_module_twin notifies as well; a tags-only change does not.
    sdk_call(rm.update_module_twin, did, mid, Twin(tags={"secret": 1}))
    t2 = sdk_call(rm.replace_module_twin, did, mid, Twin(properties=TwinProperties(desired={"mode": "eco"})))
    patch = patches.get(timeout=15)
    assert patch["$version"] == t2.properties.desired["$version"], patch
    assert patch.get("mode") == "eco"
    with pytest.raises(queue.Empty):
        patches.get(timeout=1.5)
    assert client.get_twin()["desired"]["mode"] == "eco"

    client.disconnect()
    wait_until(
        lambda: rm.get_module(did, mid).connection_state == "Disconnected",
        timeout=10,
        what="module Disconnected",
    )


@pytest.fixture(scope="module")
def events(hub: Hub) -> Iterator[StreamReader]:
    """One reader of the built-in endpoint for the whole file."""
    reader = StreamReader(hub)
    yield reader
    reader.close(wait=False)


def _of_module(evs: list, did: str, mid: str) -> list:
    return [
        e
        for e in evs
        if text(sysprops(e).get("iothub-connection-device-id")) == did
        and text(sysprops(e).get("iothub-connection-module-id")) == mid
    ]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_module_telemetry_and_outputs_read_back(
    hub: Hub, rm, module_client, device_client, events, transport
):
    from azure.iot.device import Message

    did = new_device(rm)
    mod = new_module(rm, did)
    mid = mod.module_id
    client = module_client(module_cs(hub, did, mid, module_key(mod)), websockets=transport == "websockets")
    client.connect()

    plain = Message(json.dumps({"t": 21.5}))
    plain.content_type = "application/json"
    plain.content_encoding = "utf-8"
    plain.custom_properties["tag"] = "plain"
    client.send_message(plain)
    out = Message(json.dumps({"t": 22.5}))
    out.custom_properties["tag"] = "output"
    client.send_message_to_output(out, "alerts")
    client.send_message_to_output("text body", "logs")

    # The device itself sends too: its messages carry no module id.
    dev = device_client(hub.device_cs(did))
    dev.connect()
    dev_msg = Message("from the device")
    dev_msg.custom_properties["tag"] = "device"
    dev.send_message(dev_msg)

    def device_and_module(evs: list) -> bool:
        return len(_of_module(evs, did, mid)) >= 3 and any(
            text(sysprops(e).get("iothub-connection-device-id")) == did
            and "iothub-connection-module-id" not in sysprops(e)
            for e in evs
        )

    evs = events.wait_for(device_and_module, what=f"3 messages of {did}/{mid} and 1 of {did}")
    mine = _of_module(evs, did, mid)
    assert len(mine) == 3, [e.body_as_str() for e in mine]
    first, second, third = mine  # one sender: one partition, in order
    assert json.loads(first.body_as_str()) == {"t": 21.5}
    assert props(first)["tag"] == "plain"
    assert "iothub-outputname" not in sysprops(first)
    assert text(sysprops(first).get("content-type")) == "application/json"
    assert text(sysprops(first)["iothub-message-source"]) == "Telemetry"
    auth = json.loads(text(sysprops(first)["iothub-connection-auth-method"]))
    assert auth["scope"] == "module" and auth["type"] == "sas", auth
    # The sender's generation: the module's, not its device's.
    assert text(sysprops(first)["iothub-connection-auth-generation-id"]) == mod.generation_id
    assert json.loads(second.body_as_str()) == {"t": 22.5}
    assert props(second)["tag"] == "output"
    assert text(sysprops(second).get("iothub-outputname")) == "alerts", sysprops(second)
    assert third.body_as_str() == "text body"
    assert text(sysprops(third).get("iothub-outputname")) == "logs", sysprops(third)

    from_device = [
        e
        for e in evs
        if text(sysprops(e).get("iothub-connection-device-id")) == did
        and "iothub-connection-module-id" not in sysprops(e)
    ]
    assert [e.body_as_str() for e in from_device] == ["from the device"]
    # A module's messages go to its device's partition.
    assert {e.sequence_number for e in mine}.isdisjoint({e.sequence_number for e in from_device})


def test_device_and_modules_connected_at_once_get_their_own_methods(
    hub: Hub, rm, module_client, device_client
):
    did = new_device(rm)
    mods = [new_module(rm, did, mid) for mid in ("left", "right")]
    dev = device_client(hub.device_cs(did))
    dev.connect()
    clients = {None: dev}
    for mod in mods:
        c = module_client(module_cs(hub, did, mod.module_id, module_key(mod)))
        c.connect()
        clients[mod.module_id] = c
    calls: dict[str | None, list] = {k: [] for k in clients}
    for k, c in clients.items():
        answering(c, calls[k], tag=k or "device")

    assert rm.get_device(did).connection_state == "Connected"
    for mod in mods:
        assert rm.get_module(did, mod.module_id).connection_state == "Connected"

    res = sdk_call(rm.invoke_device_method, did, CloudToDeviceMethod(method_name="d", payload=1))
    assert res.payload["by"] == "device"
    for mid in ("left", "right", "left"):
        res = sdk_call(invoke_module, rm, did, mid, f"to-{mid}", {"n": 1})
        assert res.status == 200 and res.payload["by"] == mid and res.payload["name"] == f"to-{mid}"
    assert [c.name for c in calls[None]] == ["d"]
    assert [c.name for c in calls["left"]] == ["to-left", "to-left"]
    assert [c.name for c in calls["right"]] == ["to-right"]

    # Twins too: each identity reports into its own twin.
    for k, c in clients.items():
        c.patch_twin_reported_properties({"who": k or "device"})
    assert rm.get_twin(did).properties.reported["who"] == "device"
    for mid in ("left", "right"):
        assert rm.get_module_twin(did, mid).properties.reported["who"] == mid

    # Dropping one module leaves the device and the other module connected.
    clients["left"].disconnect()
    wait_until(
        lambda: rm.get_module(did, "left").connection_state == "Disconnected",
        timeout=10,
        what="left Disconnected",
    )
    with pytest.raises(HttpOperationError) as info:
        invoke_module(rm, did, "left")
    assert_iothub_error(info.value.response, 404, 404103, "DeviceNotOnline")
    assert sdk_call(invoke_module, rm, did, "right", "again").payload["by"] == "right"
    res = sdk_call(rm.invoke_device_method, did, CloudToDeviceMethod(method_name="d2", payload=None))
    assert res.payload["by"] == "device"


def test_deleting_a_connected_module_closes_its_session(hub: Hub, rm, module_client):
    did = new_device(rm)
    mod = new_module(rm, did)
    client = module_client(module_cs(hub, did, mod.module_id, module_key(mod)), connection_retry=False)
    client.connect()
    rm.delete_module(did, mod.module_id)
    wait_until(lambda: not client.connected, timeout=10, what="module client disconnected")


def test_disabling_the_device_disconnects_and_refuses_its_modules(hub: Hub, rm, module_client):
    """IoT Hub ends a disabled device's module connections too (after a propagation delay
    there; at once here), and refuses them until the device is enabled again."""
    from azure.iot.device.exceptions import CredentialError

    did = new_device(rm)
    mod = new_module(rm, did)
    cs = module_cs(hub, did, mod.module_id, module_key(mod))
    connected = module_client(cs, connection_retry=False)
    connected.connect()
    dev = rm.get_device(did)
    keys = dev.authentication.symmetric_key
    sdk_call(rm.update_device_with_sas, did, dev.etag, keys.primary_key, keys.secondary_key, "disabled")
    wait_until(lambda: not connected.connected, timeout=10, what="the module of a disabled device dropped")
    wait_until(
        lambda: rm.get_module(did, mod.module_id).connection_state == "Disconnected",
        timeout=10,
        what="module Disconnected",
    )
    err = connect_refused(module_client(cs))
    assert isinstance(err, CredentialError), repr(err)

    sdk_call(rm.update_device_with_sas, did, None, keys.primary_key, keys.secondary_key, "enabled")
    again = module_client(cs)
    again.connect()
    assert again.connected


def test_new_module_keys_end_the_session_signed_with_the_old_ones(hub: Hub, rm, module_client):
    from azure.iot.device.exceptions import CredentialError

    did = new_device(rm)
    mod = new_module(rm, did)
    old_cs = module_cs(hub, did, mod.module_id, module_key(mod))
    client = module_client(old_cs, connection_retry=False)
    client.connect()
    new_key = random_key()
    sdk_call(rm.update_module_with_sas, did, mod.module_id, None, mod.etag, new_key, random_key())
    wait_until(lambda: not client.connected, timeout=10, what="the old-key session closed")
    err = connect_refused(module_client(old_cs))
    assert isinstance(err, CredentialError), repr(err)
    fresh = module_client(module_cs(hub, did, mod.module_id, new_key))
    fresh.connect()
    assert rm.get_module(did, mod.module_id).connection_state == "Connected"


def test_a_second_connection_of_a_module_replaces_the_first(hub: Hub, rm, module_client):
    did = new_device(rm)
    mod = new_module(rm, did)
    cs = module_cs(hub, did, mod.module_id, module_key(mod))
    first = module_client(cs, connection_retry=False)
    first.connect()
    second = module_client(cs, connection_retry=False)
    second.connect()
    wait_until(lambda: not first.connected, timeout=10, what="the first connection closed")
    calls: list = []
    answering(second, calls, tag="second")
    assert sdk_call(invoke_module, rm, did, mod.module_id).payload["by"] == "second"


def test_update_module_with_x509_and_certificate_authority(rm):
    did = new_device(rm)
    created = new_module(rm, did)
    mid = created.module_id
    p, s = _thumbprint(), _thumbprint()
    m1 = rm.update_module_with_x509(did, mid, None, created.etag, p, s)
    assert _status(rm) in (200, 201)
    assert m1.authentication.type == "selfSigned"
    assert m1.authentication.x509_thumbprint.primary_thumbprint == p
    assert m1.generation_id == created.generation_id and m1.etag != created.etag
    # This call also puts the etag in the body (wire-protocol.md).
    m2 = rm.update_module_with_certificate_authority(did, mid, "ca-manager", m1.etag)
    assert _status(rm) in (200, 201)
    assert m2.authentication.type == "certificateAuthority"
    assert m2.managed_by == "ca-manager"
    with pytest.raises(HttpOperationError) as info:
        rm.update_module_with_certificate_authority(did, mid, None, m1.etag)
    assert_iothub_error(info.value.response, 412)
    # Back to SAS with generated keys.
    m3 = rm.update_module_with_sas(did, mid, None, m2.etag, None, None)
    assert m3.authentication.type == "sas"
    assert m3.authentication.symmetric_key.primary_key and m3.authentication.symmetric_key.secondary_key


def test_module_that_never_answers_gives_504101(hub: Hub, rm, module_client):
    did = new_device(rm)
    mod = new_module(rm, did)
    client = module_client(module_cs(hub, did, mod.module_id, module_key(mod)))
    client.connect()
    seen: list = []
    client.on_method_request_received = seen.append  # receives, never answers
    started = time.monotonic()
    with pytest.raises(HttpOperationError) as info:
        invoke_module(rm, did, mod.module_id, "slow", response_timeout_in_seconds=5)
    elapsed = time.monotonic() - started
    assert_iothub_error(info.value.response, 504, 504101, "GatewayTimeout")
    assert 4.5 <= elapsed <= 20, f"504 after {elapsed:.1f}s, expected about 5s"
    assert [r.name for r in seen] == ["slow"]


def test_input_subscription_is_accepted_and_methods_still_work(hub: Hub, rm, module_client):
    """on_message_received subscribes to devices/{d}/modules/{m}/inputs/#. Without IoT Edge
    nothing is ever routed to a module input, so no message may arrive."""
    did = new_device(rm)
    mod = new_module(rm, did)
    client = module_client(module_cs(hub, did, mod.module_id, module_key(mod)))
    client.connect()
    inputs: queue.Queue = queue.Queue()
    client.on_message_received = inputs.put  # returns after the SUBACK
    assert client.connected
    calls: list = []
    answering(client, calls, tag="m")
    assert sdk_call(invoke_module, rm, did, mod.module_id).status == 200
    with pytest.raises(queue.Empty):
        inputs.get(timeout=1)


def test_desired_properties_set_while_offline_reach_the_module(hub: Hub, rm, module_client):
    did = new_device(rm)
    mod = new_module(rm, did)
    t = sdk_call(
        rm.update_module_twin, did, mod.module_id, Twin(properties=TwinProperties(desired={"level": 4}))
    )
    client = module_client(module_cs(hub, did, mod.module_id, module_key(mod)))
    client.connect()
    twin = client.get_twin()
    assert twin["desired"]["level"] == 4
    assert twin["desired"]["$version"] == t.properties.desired["$version"]


@pytest.mark.parametrize("mid", ["temp.sensor-1_a:b(2)@x", "a%b$c'd*e!f?g=h,i", "x%2Fy"])
def test_module_ids_with_punctuation_work_end_to_end(hub: Hub, rm, module_client, mid):
    """Module ids may hold - : . + % _ # * ? ! ( ) , = @ ; $ ' (IoT Hub's rule); the SDKs put
    them in URL paths (quoted), SAS resources (quoted) and MQTT client ids, user names and
    topics (not quoted). Not tested: '#' and '+' (paho refuses to publish to a topic holding
    MQTT wildcards) and ';' (the SDK's connection string parser splits on it)."""
    did = new_device(rm)
    mod = new_module(rm, did, mid)
    assert mod.module_id == mid
    assert rm.get_module(did, mid).module_id == mid
    assert [x.module_id for x in rm.get_modules(did)] == [mid]
    client = module_client(module_cs(hub, did, mid, module_key(mod)))
    client.connect()
    client.patch_twin_reported_properties({"ok": True})
    assert rm.get_module_twin(did, mid).properties.reported["ok"] is True
    calls: list = []
    answering(client, calls, tag=mid)
    assert sdk_call(invoke_module, rm, did, mid).payload["by"] == mid
    client.send_message("hello")
    items = _query(rm, f"SELECT * FROM devices.modules WHERE deviceId = '{did}'")
    assert [t.module_id for t in items] == [mid]


def test_module_subscriptions_survive_a_hub_restart(fresh_hub: Hub, module_client_factory):
    """The SDK never subscribes again after a reconnect: the hub must keep a module's
    subscriptions across its own restart, as it does a device's."""
    hub = fresh_hub
    rm = hub.registry()
    did = new_device(rm)
    mod = new_module(rm, did)
    client = module_client_factory(hub)(
        module_cs(hub, did, mod.module_id, module_key(mod)), connection_retry_interval=2
    )
    client.connect()
    calls: list = []
    answering(client, calls, tag="m")
    patches: queue.Queue = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    assert sdk_call(invoke_module, rm, did, mod.module_id).status == 200

    assert hub.restart() == 0
    wait_until(lambda: client.connected, timeout=40, what="module client reconnect after hub restart")
    rm = hub.registry()
    res = sdk_call(
        rm.invoke_device_module_method,
        did,
        mod.module_id,
        CloudToDeviceMethod(method_name="after", payload=None, connect_timeout_in_seconds=10),
    )
    assert res.status == 200 and res.payload["name"] == "after"
    sdk_call(rm.update_module_twin, did, mod.module_id, Twin(properties=TwinProperties(desired={"r": 1})))
    # After a reconnect the SDK gets the twin and hands over the whole desired document as
    # a patch when its $version moved ("ensure desired properties"); the real patch follows.
    seen = [patches.get(timeout=15)]
    while "r" not in seen[-1] and len(seen) < 3:
        seen.append(patches.get(timeout=15))
    assert seen[-1].get("r") == 1, seen


# --------------------------------------------------------------------------------------------
# Token boundaries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sdk_keys_do_not_cross_identities(hub: Hub, rm, module_client, device_client, transport):
    from azure.iot.device.exceptions import CredentialError

    ws = transport == "websockets"
    did = new_device(rm)
    dev_key = hub.device_key(did)
    m1, m2 = new_module(rm, did, "m1"), new_module(rm, did, "m2")
    k1 = module_key(m1)

    cases = {
        "module key as its device": lambda: device_client(hub.device_cs_for(did, k1), websockets=ws),
        "device key as its module": lambda: module_client(module_cs(hub, did, "m1", dev_key), websockets=ws),
        "module key as a sibling": lambda: module_client(module_cs(hub, did, "m2", k1), websockets=ws),
    }
    for what, make in cases.items():
        err = connect_refused(make())
        assert isinstance(err, CredentialError), f"{what}: {err!r}"

    # Control: each key signs in as its own identity.
    ok = module_client(module_cs(hub, did, "m2", module_key(m2)), websockets=ws)
    ok.connect()
    assert ok.connected


def test_a_module_token_cannot_use_its_devices_https_endpoints(hub: Hub, rm):
    """The device-facing HTTPS endpoints (telemetry, cloud-to-device receive) authenticate the
    device named in the path: a module's token, though signed with a valid key, is refused."""
    did = new_device(rm)
    mod = new_module(rm, did)
    se = int(time.time()) + 3600
    token = module_sas(hub.hostname, did, mod.module_id, module_key(mod), se)
    params = {"api-version": "2021-04-12"}
    for method, path in (
        ("POST", f"/devices/{did}/messages/events"),
        ("GET", f"/devices/{did}/messages/devicebound"),
    ):
        r = requests.request(
            method,
            hub.base_url + path,
            params=params,
            headers={"Authorization": token, "Content-Type": "application/json"},
            data=b"{}" if method == "POST" else None,
            verify=str(hub.ca_bundle),
            timeout=30,
        )
        assert r.status_code == 401, f"{method} {path} with a module token -> {r.status_code} {r.text[:300]}"
    # Control: the device's own token is accepted.
    r = requests.post(
        f"{hub.base_url}/devices/{did}/messages/events",
        params=params,
        headers={"Authorization": device_sas(hub.hostname, did, hub.device_key(did), se)},
        data=b"{}",
        verify=str(hub.ca_bundle),
        timeout=30,
    )
    assert r.status_code == 204, r.text


@pytest.fixture
def raw(hub: Hub) -> Iterator[Callable[[], m.RawMqtt]]:
    conns: list[m.RawMqtt] = []

    def open_conn() -> m.RawMqtt:
        c = m.RawMqtt(hub.ip, hub.mqtt_port, str(hub.ca_pem))
        conns.append(c)
        return c

    yield open_conn
    for c in conns:
        c.close()


def _raw_connect(conn: m.RawMqtt, host: str, client_id: str, password: str) -> int:
    """A CONNECT as the SDK sends it for `client_id` (a device id or `d/m`); the CONNACK code."""
    username = f"{host}/{client_id}/?api-version={m.DEVICE_API_VERSION}"
    conn.send(m.connect_packet(client_id, username, password))
    p = conn.read_packet(10)
    assert p.ptype == m.CONNACK, f"expected CONNACK, got {p}"
    return m.connack_code(p)


def test_raw_tokens_stand_only_for_their_own_identity(hub: Hub, rm, raw):
    did = new_device(rm)
    dev_key = hub.device_key(did)
    k1, k2 = module_key(new_module(rm, did, "m1")), module_key(new_module(rm, did, "m2"))
    host, se = hub.hostname, int(time.time()) + 3600
    m1_token = module_sas(host, did, "m1", k1, se)
    dev_token = device_sas(host, did, dev_key, se)

    refused = {
        # A correctly signed module token presented by the device's client id.
        "module token as device": (did, m1_token),
        # A correctly signed device token presented by a module's client id.
        "device token as module": (f"{did}/m1", dev_token),
        # A module token presented by its sibling.
        "m1 token as m2": (f"{did}/m2", m1_token),
        # A token naming m2 but signed with m1's key.
        "m2 resource, m1 key": (f"{did}/m2", module_sas(host, did, "m2", k1, se)),
        # A token naming m1 signed with the device's key.
        "m1 resource, device key": (f"{did}/m1", module_sas(host, did, "m1", dev_key, se)),
        # A module of another device with the same module id.
        "m1 token on another device": (f"{new_device(rm)}/m1", m1_token),
    }
    for what, (client_id, token) in refused.items():
        conn = raw()
        code = _raw_connect(conn, host, client_id, token)
        assert code == 5, f"{what}: CONNACK {code}, expected 5 (not authorized)"
        conn.expect_closed(within=5)

    for client_id, token in (
        (f"{did}/m1", m1_token),
        (f"{did}/m2", module_sas(host, did, "m2", k2, se)),
        (did, dev_token),
    ):
        conn = raw()
        assert _raw_connect(conn, host, client_id, token) == 0, f"{client_id} with its own token"


def test_raw_policy_tokens_name_one_identity_too(hub: Hub, rm, raw):
    """A token signed with a shared access policy that grants DeviceConnect (skn=device) may
    sign in any identity, but only the one its `sr` names."""
    did = new_device(rm)
    new_module(rm, did, "m1")
    policy = hub.credentials("device")
    host, se = hub.hostname, int(time.time()) + 3600

    def policy_token(resource: str) -> str:
        sr = urllib.parse.quote(f"{host}/{resource}", safe="")
        sig = urllib.parse.quote(sign(policy.key, f"{sr}\n{se}"), safe="")
        return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={policy.policy}"

    module_token = policy_token(f"devices/{did}/modules/m1")
    device_policy_token = policy_token(f"devices/{did}")
    for client_id, token, want in (
        (f"{did}/m1", module_token, 0),
        (did, module_token, 5),
        (f"{did}/m1", device_policy_token, 5),
        (did, device_policy_token, 0),
    ):
        conn = raw()
        code = _raw_connect(conn, host, client_id, token)
        assert code == want, f"{client_id} with a policy token: CONNACK {code}, expected {want}"


# (who signs in, the foreign packet it then sends). The hub closes the connection: MQTT 3.1.1
# has no negative PUBACK, and IoT Hub closes on a forbidden SUBSCRIBE too.
FOREIGN_PACKETS = {
    "module-publishes-device-telemetry": ("m1", "publish", "devices/{d}/messages/events/"),
    "module-publishes-sibling-telemetry": ("m1", "publish", "devices/{d}/modules/m2/messages/events/"),
    "module-subscribes-sibling-inputs": ("m1", "subscribe", "devices/{d}/modules/m2/inputs/#"),
    "module-subscribes-device-c2d": ("m1", "subscribe", "devices/{d}/messages/devicebound/#"),
    "device-publishes-module-telemetry": (None, "publish", "devices/{d}/modules/m1/messages/events/"),
    "device-subscribes-module-inputs": (None, "subscribe", "devices/{d}/modules/m1/inputs/#"),
}


@pytest.mark.parametrize("case", list(FOREIGN_PACKETS))
def test_sessions_keep_to_their_own_topics(hub: Hub, rm, raw, case):
    who, kind, topic = FOREIGN_PACKETS[case]
    did = new_device(rm)
    k1 = module_key(new_module(rm, did, "m1"))
    new_module(rm, did, "m2")
    se = int(time.time()) + 3600
    conn = raw()
    if who is None:
        token, client_id = device_sas(hub.hostname, did, hub.device_key(did), se), did
        own_sub, own_pub = f"devices/{did}/messages/devicebound/#", f"devices/{did}/messages/events/"
    else:
        token, client_id = module_sas(hub.hostname, did, who, k1, se), f"{did}/{who}"
        own_sub = f"devices/{did}/modules/{who}/inputs/#"
        own_pub = f"devices/{did}/modules/{who}/messages/events/"
    assert _raw_connect(conn, hub.hostname, client_id, token) == 0

    # Its own topics are fine.
    conn.send(m.subscribe_packet(1, [(own_sub, 1), ("$iothub/methods/POST/#", 0)]))
    ack = conn.wait_for(lambda p: p.ptype == m.SUBACK, timeout=10)
    assert ack.body[2:] == bytes([1, 0]), f"SUBACK {ack.body!r}"
    conn.send(m.publish_packet(own_pub, b"mine", qos=1, pid=2))
    conn.wait_for(lambda p: p.ptype == m.PUBACK, timeout=10)

    foreign = topic.format(d=did)
    if kind == "publish":
        conn.send(m.publish_packet(foreign, b"x", qos=1, pid=3))
    else:
        conn.send(m.subscribe_packet(3, [(foreign, 1)]))
    _closed_at, seen = conn.expect_closed(within=10)
    acks = [p for p in seen if p.ptype in (m.PUBACK, m.SUBACK)]
    assert not acks, f"the hub acknowledged {case}: {acks}"


def test_module_sas_connection_string_token_from_the_sdk(hub: Hub, rm, module_client):
    """IoTHubModuleClient.create_from_sastoken with a token we sign: the SDK reads device and
    module ids from its `sr`."""
    from azure.iot.device import IoTHubModuleClient

    did = new_device(rm)
    mod = new_module(rm, did)
    token = module_sas(hub.hostname, did, mod.module_id, module_key(mod), int(time.time()) + 3600)
    client = IoTHubModuleClient.create_from_sastoken(token, server_verification_cert=hub.ca_pem.read_text())
    try:
        client.connect()
        client.patch_twin_reported_properties({"via": "sastoken"})
        assert rm.get_module_twin(did, mod.module_id).properties.reported["via"] == "sastoken"
    finally:
        shutdown_bounded(client)


def test_routes_see_the_module_id_and_the_module_twin(hub_factory, module_client_factory, device_client):
    """Message routing on a module's messages: `$connectionModuleId` names the sender and
    `$twin` is the module's twin, not its device's. A hub of its own: routes are hub-wide."""
    from routelib import cli_ok, message, read_to_end, tag_of

    hub = hub_factory()
    rm = hub.registry()
    did = new_device(rm, "mroute")
    sdk_call(rm.update_twin, did, Twin(tags={"site": "device-site"}))
    mods = {mid: new_module(rm, did, mid) for mid in ("filter", "other")}
    for mid in mods:
        sdk_call(rm.update_module_twin, did, mid, Twin(tags={"site": "a"}))
    cli_ok(hub, "endpoint", "add", "mods", "--kind", "stream")
    cli_ok(
        hub,
        "route",
        "add",
        "module-route",
        "--source",
        "DeviceMessages",
        "--condition",
        "$connectionModuleId = 'filter' AND $twin.tags.site = 'a'",
        "--endpoint",
        "mods",
    )
    make = module_client_factory(hub)
    for mid, mod in mods.items():
        client = make(module_cs(hub, did, mid, module_key(mod)))
        client.connect()
        client.send_message(message(f"from-{mid}", {"n": 1}))
    dev = device_client(hub.device_cs(did))
    dev.connect()
    dev.send_message(message("from-device", {"n": 1}))

    def sent_by(events: list) -> list[tuple[str, str | None]]:
        return sorted(
            (text(sysprops(e).get("iothub-connection-module-id", "")), tag_of(e))
            for e in events
            if text(sysprops(e).get("iothub-connection-device-id")) == did
        )

    assert sent_by(read_to_end(hub, "mods")) == [("filter", "from-filter")]
    assert sent_by(read_to_end(hub)) == [("", "from-device"), ("other", "from-other")]


# --------------------------------------------------------------------------------------------
# The Node.js service SDK (azure-iothub 1.16.6)
# --------------------------------------------------------------------------------------------


def _node_line(run, kind: str) -> dict:
    lines = run.of_type(kind)
    assert len(lines) == 1, f"{len(lines)} {kind!r} lines\n{run.explain()}"
    return lines[0]


def test_node_registry_twin_and_module_method(hub: Hub, rm, module_client):
    from node_runner import run_node

    did = new_device(rm, "mnode")
    cs = hub.service_cs()
    run = run_node("modules_service.mjs", hub, "registry", cs, did, "nodemod", timeout=60)
    assert run.returncode == 0 and not run.errors, run.explain()
    added = _node_line(run, "added")
    assert added["statusCode"] in (200, 201)
    assert added["module"]["moduleId"] == "nodemod" and added["module"]["deviceId"] == did
    assert added["module"]["managedBy"] == "node"
    key = added["module"]["authentication"]["symmetricKey"]["primaryKey"]
    assert key, added
    assert _node_line(run, "got")["module"]["etag"] == added["module"]["etag"]
    assert _node_line(run, "list")["moduleIds"] == ["nodemod"]
    dup = _node_line(run, "duplicate-error")
    assert dup["statusCode"] == 409 and dup["name"] == "DeviceAlreadyExistsError", dup
    assert "409301" in dup["body"], dup
    updated = _node_line(run, "updated")["module"]
    assert updated["managedBy"] == "node-updated" and updated["etag"] != added["module"]["etag"]
    twin = _node_line(run, "twin")["twin"]
    assert twin["moduleId"] == "nodemod" and twin["deviceId"] == did
    assert twin["tags"] == {"lang": "node"} and twin["desired"]["interval"] == 9
    missing = _node_line(run, "missing-error")
    assert missing["statusCode"] == 404 and "404010" in missing["body"], missing
    # The Python service SDK sees what Node wrote.
    assert rm.get_module_twin(did, "nodemod").tags == {"lang": "node"}

    client = module_client(module_cs(hub, did, "nodemod", key))
    client.connect()
    calls: list = []
    answering(client, calls, status=202, tag="py-module")
    run = run_node("modules_service.mjs", hub, "invoke", cs, did, "nodemod", "hello", '{"n": 7}', timeout=60)
    invoked = _node_line(run, "invoked")
    assert invoked["statusCode"] == 200, run.explain()
    assert invoked["result"] == {
        "status": 202,
        "payload": {"by": "py-module", "name": "hello", "payload": {"n": 7}},
    }

    # Removing a connected module ends its session.
    run = run_node("modules_service.mjs", hub, "remove", cs, did, "nodemod", timeout=60)
    assert _node_line(run, "removed")["statusCode"] == 204, run.explain()
    with pytest.raises(HttpOperationError) as info:
        rm.get_module(did, "nodemod")
    assert_iothub_error(info.value.response, 404, 404010, "ModuleNotFound")
    wait_until(lambda: not client.connected, timeout=10, what="the removed module's session closed")
