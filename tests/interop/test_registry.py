"""Device registry over REST through azure-iot-hub's IoTHubRegistryManager (wire-protocol e.1/e.2, h).

Every call's exact success status is asserted through the recorder hook, because the SDK
hides it. One hub serves the whole module; each test works on devices of its own.
"""

from __future__ import annotations

import base64
import datetime as dt
import os

import pytest
from azure.iot.hub.models import (
    AuthenticationMechanism,
    ExportImportDevice,
    SymmetricKey,
)
from msrest.exceptions import HttpOperationError

from harness import Hub, random_key, unique_id


def _thumbprint() -> str:
    return os.urandom(20).hex().upper()


def _parse_time(value: str) -> dt.datetime:
    # RFC 3339 with any fraction length; Python 3.11's fromisoformat takes "Z".
    return dt.datetime.fromisoformat(value)


def _status(rm) -> int:
    return rm.recorder.last


def test_create_device_with_sas_keeps_given_keys(rm):
    did, pk, sk = unique_id(), random_key(), random_key()
    dev = rm.create_device_with_sas(did, pk, sk, "enabled")
    assert rm.recorder.last_call()[0] == "PUT" and _status(rm) == 200
    assert dev.device_id == did
    assert dev.status == "enabled"
    assert dev.authentication.type == "sas"
    assert dev.authentication.symmetric_key.primary_key == pk
    assert dev.authentication.symmetric_key.secondary_key == sk
    assert dev.capabilities.iot_edge is False
    assert dev.etag and dev.generation_id


def test_create_device_with_sas_none_keys_generates_keys(rm):
    did = unique_id()
    dev = rm.create_device_with_sas(did, None, None, "enabled")
    assert _status(rm) == 200
    pk = dev.authentication.symmetric_key.primary_key
    sk = dev.authentication.symmetric_key.secondary_key
    assert pk and sk and pk != sk
    for key in (pk, sk):
        assert 16 <= len(base64.b64decode(key, validate=True)) <= 64
    again = rm.get_device(did)
    assert again.authentication.symmetric_key.primary_key == pk, "generated keys must be stored"


def test_create_device_with_x509(rm):
    did, p, s = unique_id(), _thumbprint(), _thumbprint()
    dev = rm.create_device_with_x509(did, p, s, "enabled")
    assert _status(rm) == 200
    assert dev.authentication.type == "selfSigned"
    assert dev.authentication.x509_thumbprint.primary_thumbprint == p
    assert dev.authentication.x509_thumbprint.secondary_thumbprint == s
    got = rm.get_device(did)
    assert got.authentication.x509_thumbprint.primary_thumbprint == p


def test_create_device_with_certificate_authority(rm):
    did = unique_id()
    dev = rm.create_device_with_certificate_authority(did, "disabled")
    assert _status(rm) == 200
    assert dev.authentication.type == "certificateAuthority"
    assert dev.status == "disabled"
    assert rm.get_device(did).authentication.type == "certificateAuthority"


def _update(rm, kind: str, did: str, etag):
    if kind == "sas":
        pk, sk = random_key(), random_key()
        dev = rm.update_device_with_sas(did, etag, pk, sk, "disabled", status_reason="maintenance")
        assert dev.authentication.symmetric_key.primary_key == pk
        assert dev.authentication.symmetric_key.secondary_key == sk
        assert dev.authentication.type == "sas"
    elif kind == "x509":
        p, s = _thumbprint(), _thumbprint()
        dev = rm.update_device_with_x509(did, etag, p, s, "disabled", status_reason="maintenance")
        assert dev.authentication.type == "selfSigned"
        assert dev.authentication.x509_thumbprint.primary_thumbprint == p
    else:
        dev = rm.update_device_with_certificate_authority(did, etag, "disabled", status_reason="maintenance")
        assert dev.authentication.type == "certificateAuthority"
    return dev


@pytest.mark.parametrize("kind", ["sas", "x509", "certificate_authority"])
@pytest.mark.parametrize("etag_mode", ["real-etag", "etag-None"])
def test_update_device(rm, kind, etag_mode):
    did = unique_id()
    created = rm.create_device_with_sas(did, random_key(), random_key(), "enabled")
    etag = created.etag if etag_mode == "real-etag" else None
    updated = _update(rm, kind, did, etag)
    method, _url, status = rm.recorder.last_call()
    assert (method, status) == ("PUT", 200)
    assert updated.status == "disabled"
    assert updated.status_reason == "maintenance"
    assert updated.etag and updated.etag != created.etag, "an update must change the etag"
    assert updated.generation_id == created.generation_id, "generationId is immutable"
    got = rm.get_device(did)
    assert got.status == "disabled" and got.etag == updated.etag


def test_get_device_shape(rm, hub: Hub):
    did = unique_id()
    created = rm.create_device_with_sas(did, None, None, "enabled")
    dev = rm.get_device(did)
    assert rm.recorder.last_call()[0] == "GET" and _status(rm) == 200
    assert dev.device_id == did and dev.etag == created.etag
    assert dev.generation_id == created.generation_id
    assert dev.connection_state == "Disconnected"
    assert dev.cloud_to_device_message_count == 0
    assert dev.capabilities.iot_edge is False

    # The JSON itself: key spelling matters to the other SDKs (statusUpdatedTime, not ...Update...).
    r = hub.rest("GET", f"/devices/{did}")
    assert r.status_code == 200, r.text
    body = r.json()
    for key in (
        "deviceId",
        "generationId",
        "etag",
        "connectionState",
        "status",
        "statusUpdatedTime",
        "lastActivityTime",
        "cloudToDeviceMessageCount",
        "authentication",
        "capabilities",
    ):
        assert key in body, f"Device JSON lacks {key}: {body}"
    assert body["deviceId"] == did
    assert isinstance(body["generationId"], str) and body["generationId"]
    assert isinstance(body["etag"], str) and body["etag"]
    assert body["status"] == "enabled"
    assert isinstance(body["cloudToDeviceMessageCount"], int)
    assert body["capabilities"] == {"iotEdge": False}
    assert body["authentication"]["type"] == "sas"
    assert set(body["authentication"]["symmetricKey"]) >= {"primaryKey", "secondaryKey"}
    for key in ("statusUpdatedTime", "lastActivityTime"):
        _parse_time(body[key])


def test_get_devices_with_and_without_limit(rm):
    ids = {unique_id("list") for _ in range(3)}
    for did in ids:
        rm.create_device_with_sas(did, None, None, "enabled")
    everything = rm.get_devices()
    assert rm.recorder.last_call()[0] == "GET" and _status(rm) == 200
    listed = {d.device_id for d in everything}
    assert ids <= listed, f"missing {ids - listed}"
    assert len(listed) == len(everything), "a device is listed twice"

    limited = rm.get_devices(max_number_of_devices=2)
    assert _status(rm) == 200
    assert "top=2" in rm.recorder.last_call()[1]
    assert len(limited) == 2
    assert {d.device_id for d in limited} <= listed


@pytest.mark.parametrize("with_etag", [True, False], ids=["with-etag", "without-etag"])
def test_delete_device_answers_204(rm, with_etag):
    did = unique_id()
    dev = rm.create_device_with_sas(did, None, None, "enabled")
    assert rm.delete_device(did, dev.etag if with_etag else None) is None
    assert rm.recorder.last_call()[0] == "DELETE" and _status(rm) == 204
    with pytest.raises(HttpOperationError) as info:
        rm.get_device(did)
    assert info.value.response.status_code == 404
    with pytest.raises(HttpOperationError) as info:
        rm.get_twin(did)
    assert info.value.response.status_code == 404, "deleting a device must delete its twin"


def test_recreated_device_gets_new_generation_id(rm):
    did = unique_id()
    first = rm.create_device_with_sas(did, None, None, "enabled")
    rm.delete_device(did)
    second = rm.create_device_with_sas(did, None, None, "enabled")
    assert second.generation_id != first.generation_id


def test_service_statistics(rm):
    stats = rm.get_service_statistics()
    assert rm.recorder.last_call()[0] == "GET" and _status(rm) == 200
    # No device ever connects to this module's hub.
    assert stats.connected_device_count == 0


def test_device_registry_statistics_count_enabled_and_disabled(rm):
    before = rm.get_device_registry_statistics()
    assert _status(rm) == 200
    rm.create_device_with_sas(unique_id(), None, None, "enabled")
    rm.create_device_with_sas(unique_id(), None, None, "disabled")
    after = rm.get_device_registry_statistics()
    assert after.total_device_count == before.total_device_count + 2
    assert after.enabled_device_count == before.enabled_device_count + 1
    assert after.disabled_device_count == before.disabled_device_count + 1
    assert after.total_device_count == after.enabled_device_count + after.disabled_device_count
    assert len(rm.get_devices()) == after.total_device_count


def _sas_auth(pk=None, sk=None) -> AuthenticationMechanism:
    return AuthenticationMechanism(type="sas", symmetric_key=SymmetricKey(primary_key=pk, secondary_key=sk))


def test_bulk_create_update_delete(rm):
    ids = [unique_id("bulk") for _ in range(5)]
    keys = {did: random_key() for did in ids}
    created = rm.bulk_create_or_update_devices(
        [
            ExportImportDevice(
                id=did,
                import_mode="create",
                status="enabled",
                authentication=_sas_auth(keys[did], random_key()),
            )
            for did in ids
        ]
    )
    assert rm.recorder.last_call()[0] == "POST" and _status(rm) == 200
    assert created.is_successful is True, created.as_dict()
    assert not created.errors
    for did in ids:
        assert rm.get_device(did).authentication.symmetric_key.primary_key == keys[did]

    updated = rm.bulk_create_or_update_devices(
        [
            ExportImportDevice(
                id=did,
                import_mode="update",
                status="disabled",
                authentication=_sas_auth(keys[did], random_key()),
            )
            for did in ids
        ]
    )
    assert _status(rm) == 200
    assert updated.is_successful is True, updated.as_dict()
    assert all(rm.get_device(did).status == "disabled" for did in ids)

    deleted = rm.bulk_create_or_update_devices(
        [ExportImportDevice(id=did, import_mode="delete") for did in ids]
    )
    assert _status(rm) == 200
    assert deleted.is_successful is True, deleted.as_dict()
    for did in ids:
        with pytest.raises(HttpOperationError) as info:
            rm.get_device(did)
        assert info.value.response.status_code == 404


def test_bulk_create_generates_keys_when_none_given(rm):
    did = unique_id("bulk")
    res = rm.bulk_create_or_update_devices(
        [ExportImportDevice(id=did, import_mode="create", status="enabled", authentication=_sas_auth())]
    )
    assert _status(rm) == 200 and res.is_successful is True, res.as_dict()
    dev = rm.get_device(did)
    assert dev.authentication.symmetric_key.primary_key and dev.authentication.symmetric_key.secondary_key


def test_bulk_mixed_batch_reports_duplicate_create(rm):
    existing = unique_id("bulk")
    rm.create_device_with_sas(existing, None, None, "enabled")
    fresh = unique_id("bulk")
    res = rm.bulk_create_or_update_devices(
        [
            ExportImportDevice(id=fresh, import_mode="create", status="enabled", authentication=_sas_auth()),
            ExportImportDevice(
                id=existing, import_mode="create", status="enabled", authentication=_sas_auth()
            ),
        ]
    )
    # The SDK accepts 200 or 400 here; IoT Hub answers a failed batch with 400 and the result body.
    assert _status(rm) == 400
    assert res is not None and res.is_successful is False, res and res.as_dict()
    failed = {e.device_id: e for e in (res.errors or [])}
    assert set(failed) == {existing}, f"errors: {[e.as_dict() for e in res.errors or []]}"
    err = failed[existing]
    assert err.error_code, err.as_dict()
    assert "AlreadyExists" in str(err.error_code) or "409" in str(err.error_code), err.as_dict()
    assert err.error_status, err.as_dict()
