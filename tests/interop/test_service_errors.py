"""REST failures: status codes the SDK surfaces, plus the IoT Hub error body and header.

The Python SDK only exposes `e.response`; the body envelope and the `iothub-errorcode`
header matter to the other SDKs (C#, Java, Node), so they are asserted on that response.
"""

from __future__ import annotations

import time

import pytest
import requests
from azure.iot.hub.models import Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from harness import API_VERSION, Hub, ServiceCredentials, assert_iothub_error, random_key, unique_id


def _fails(call, *args, **kwargs) -> HttpOperationError:
    with pytest.raises(HttpOperationError) as info:
        call(*args, **kwargs)
    assert info.value.response is not None
    return info.value


def _device(rm) -> tuple[str, object]:
    did = unique_id("err")
    return did, rm.create_device_with_sas(did, None, None, "enabled")


# ---- 409 / 412 / 404 ------------------------------------------------------------------------


def test_duplicate_create_is_409(rm):
    did, _ = _device(rm)
    e = _fails(rm.create_device_with_sas, did, None, None, "enabled")
    assert_iothub_error(e.response, 409, 409001, "DeviceAlreadyExists")


def test_stale_etag_on_device_update_is_412(rm):
    did, dev = _device(rm)
    rm.update_device_with_sas(did, dev.etag, random_key(), random_key(), "enabled")
    e = _fails(rm.update_device_with_sas, did, dev.etag, random_key(), random_key(), "disabled")
    assert_iothub_error(e.response, 412, 412001, "PreconditionFailed")
    assert rm.get_device(did).status == "enabled", "a rejected update must change nothing"


def test_stale_etag_on_delete_is_412(rm):
    did, dev = _device(rm)
    rm.update_device_with_sas(did, dev.etag, random_key(), random_key(), "enabled")
    e = _fails(rm.delete_device, did, dev.etag)
    assert_iothub_error(e.response, 412, 412001, "PreconditionFailed")
    assert rm.get_device(did).device_id == did, "a rejected delete must not delete"


def test_stale_etag_on_twin_update_and_replace_is_412(rm):
    did, _ = _device(rm)
    t0 = rm.get_twin(did)
    rm.update_twin(did, Twin(tags={"a": 1}), t0.etag)
    e = _fails(rm.update_twin, did, Twin(tags={"a": 2}), t0.etag)
    assert_iothub_error(e.response, 412, 412001, "PreconditionFailed")
    e = _fails(rm.replace_twin, did, Twin(tags={"a": 3}), t0.etag)
    assert_iothub_error(e.response, 412, 412001, "PreconditionFailed")
    assert rm.get_twin(did).tags == {"a": 1}


@pytest.mark.parametrize(
    "op",
    ["get_device", "get_twin", "delete_device", "update_twin", "replace_twin"],
)
def test_unknown_device_is_404(rm, op):
    did = unique_id("missing")
    calls = {
        "get_device": lambda: rm.get_device(did),
        "get_twin": lambda: rm.get_twin(did),
        "delete_device": lambda: rm.delete_device(did),
        "update_twin": lambda: rm.update_twin(did, Twin(tags={"a": 1})),
        "replace_twin": lambda: rm.replace_twin(did, Twin(tags={"a": 1})),
    }
    e = _fails(calls[op])
    assert_iothub_error(e.response, 404, 404001, "DeviceNotFound")


# ---- 401 ----------------------------------------------------------------------------------


def test_wrong_key_is_401(hub: Hub):
    creds = hub.credentials()
    bad = ServiceCredentials(creds.host, creds.policy, random_key())
    rm = hub.registry(cs=bad.connection_string())
    e = _fails(rm.get_devices)
    assert_iothub_error(e.response, 401, 401002, "IotHubUnauthorizedAccess")


def test_unknown_policy_is_401(hub: Hub):
    creds = hub.credentials()
    bad = ServiceCredentials(creds.host, "noSuchPolicy", creds.key)
    e = _fails(hub.registry(cs=bad.connection_string()).get_devices)
    assert_iothub_error(e.response, 401, 401002, "IotHubUnauthorizedAccess")


def test_expired_token_is_401(hub: Hub):
    creds = hub.credentials()
    # Correctly signed, but se is in the past.
    expired = creds.token(se=int(time.time()) - 300)
    r = hub.rest("GET", "/devices", token=expired)
    assert_iothub_error(r, 401, 401002, "IotHubUnauthorizedAccess")
    # The same request with a live token works, so the expiry is what was rejected.
    assert hub.rest("GET", "/devices", token=creds.token(ttl=300)).status_code == 200


@pytest.mark.parametrize(
    "token",
    [
        "",
        "Bearer abc",
        "SharedAccessSignature sr=x",
        "SharedAccessSignature sr=x&sig=%%%&se=zz&skn=iothubowner",
    ],
    ids=["empty", "bearer", "truncated", "garbage"],
)
def test_malformed_authorization_is_401(hub: Hub, token):
    r = hub.rest("GET", "/devices", headers={"Authorization": token}, auth=False)
    assert_iothub_error(r, 401, 401002, "IotHubUnauthorizedAccess")


def test_missing_authorization_is_401(hub: Hub):
    r = hub.rest("GET", "/devices", auth=False)
    assert_iothub_error(r, 401, 401002, "IotHubUnauthorizedAccess")


def test_registry_read_policy_cannot_create(hub: Hub):
    reader = hub.registry("registryRead")
    reader.get_devices()
    assert reader.recorder.last == 200, "registryRead must be allowed to read"
    e = _fails(reader.create_device_with_sas, unique_id("ro"), None, None, "enabled")
    assert_iothub_error(e.response, 401, 401002, "IotHubUnauthorizedAccess")
    writer = hub.registry("registryReadWrite")
    writer.create_device_with_sas(unique_id("rw"), None, None, "enabled")
    assert writer.recorder.last == 200, "registryReadWrite must be allowed to create"


def test_device_policy_cannot_read_registry(hub: Hub):
    e = _fails(hub.registry("device").get_devices)
    assert_iothub_error(e.response, 401, 401002, "IotHubUnauthorizedAccess")


# ---- 400 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device_id",
    ["a" * 129, "bad id", "bad&id", "bad^id", "caf\u00e9"],
    ids=["129-chars", "space", "ampersand", "caret", "non-ascii"],
)
def test_invalid_device_id_is_400(rm, device_id):
    e = _fails(rm.create_device_with_sas, device_id, None, None, "enabled")
    assert_iothub_error(e.response, 400)


def test_longest_and_special_device_ids_are_accepted(rm):
    # Boundary controls for the test above: 128 chars and IoT Hub's allowed punctuation.
    for did in ["b" * 128, "dev-._%*?!(),:=@$'+#x"]:
        dev = rm.create_device_with_sas(did, None, None, "enabled")
        assert dev.device_id == did
        assert rm.get_device(did).device_id == did
        rm.delete_device(did)


def _nested(depth: int) -> dict:
    doc: dict = {"leaf": 1}
    for i in range(depth - 1):
        doc = {f"l{i}": doc}
    return doc


@pytest.mark.parametrize(
    "desired",
    [
        {"bad.key": 1},
        {"bad$key": 1},
        {"ok": {"nested.dot": 1}},
        _nested(15),
        # 10 x 3.5 KiB: every string is under the 4 KiB value limit, the whole is over 32 KiB.
        {f"part{i}": "x" * 3584 for i in range(10)},
        {"long": "x" * 5000},
    ],
    ids=["dot-in-key", "dollar-in-key", "nested-dot", "depth-15", "desired-over-32KiB", "string-over-4KiB"],
)
def test_invalid_twin_patch_is_400(rm, hub: Hub, desired):
    did, _ = _device(rm)
    before = rm.get_twin(did)
    e = _fails(rm.update_twin, did, Twin(properties=TwinProperties(desired=desired)))
    assert_iothub_error(e.response, 400)
    after = rm.get_twin(did)
    assert after.properties.desired["$version"] == before.properties.desired["$version"]
    assert after.etag == before.etag, "a rejected patch must change nothing"


def test_valid_twin_patch_near_limits_is_accepted(rm):
    # Controls for the test above: depth 5, 4000-byte strings and ~12 KiB in all are fine.
    did, _ = _device(rm)
    blobs = {f"blob{i}": "y" * 4000 for i in range(3)}
    t = rm.update_twin(did, Twin(properties=TwinProperties(desired={"deep": _nested(5), **blobs})))
    assert rm.recorder.last == 200
    assert all(t.properties.desired[k] == v for k, v in blobs.items())


def test_invalid_tags_key_is_400(rm):
    did, _ = _device(rm)
    e = _fails(rm.update_twin, did, Twin(tags={"bad.tag": 1}))
    assert_iothub_error(e.response, 400)


def test_malformed_json_body_is_400(hub: Hub, rm):
    did, _ = _device(rm)
    r = requests.patch(
        hub.base_url + f"/twins/{did}",
        params={"api-version": API_VERSION},
        data=b'{"tags": {"a": 1',
        headers={
            "Authorization": hub.credentials().token(),
            "Content-Type": "application/json; charset=utf-8",
            "If-Match": '"*"',
        },
        verify=str(hub.ca_bundle),
        timeout=30,
    )
    assert_iothub_error(r, 400)
