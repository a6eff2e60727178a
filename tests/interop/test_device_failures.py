"""Direct-method and connection failures as the SDKs see them (wire-protocol c, d, e.3).

Offline device (404103), silent device (504101), bad credentials and disabled devices
(CredentialError), SAS renewal and hub restarts (the SDK never re-subscribes, so the hub must
keep subscriptions).
"""

from __future__ import annotations

import threading
import time

import pytest
from azure.iot.hub.models import CloudToDeviceMethod
from msrest.exceptions import HttpOperationError

from harness import Hub, assert_iothub_error, random_key, sdk_call, unique_id, wait_until

pytestmark = pytest.mark.device

RESPONSE = {"ok": True}


def _answering(client, calls: list | None = None) -> None:
    """Installs a method handler that answers every call with 200 RESPONSE."""
    from azure.iot.device import MethodResponse

    def handler(request) -> None:
        if calls is not None:
            calls.append(request)
        client.send_method_response(MethodResponse.create_from_method_request(request, 200, RESPONSE))

    client.on_method_request_received = handler


def _invoke(rm, did: str, **kwargs):
    return rm.invoke_device_method(did, CloudToDeviceMethod(method_name="ping", payload={"n": 1}, **kwargs))


def _invoke_ok(rm, did: str, **kwargs):
    return sdk_call(_invoke, rm, did, **kwargs)


def test_invoke_on_offline_device_is_404103(hub: Hub):
    did = unique_id("off")
    hub.device_cs(did)  # exists, never connected
    rm = hub.registry()
    with pytest.raises(HttpOperationError) as info:
        _invoke(rm, did)
    assert_iothub_error(info.value.response, 404, 404103, "DeviceNotOnline")


def test_invoke_on_unknown_device_is_404001(hub: Hub):
    rm = hub.registry()
    with pytest.raises(HttpOperationError) as info:
        _invoke(rm, unique_id("nobody"))
    assert_iothub_error(info.value.response, 404, 404001, "DeviceNotFound")


def test_device_that_never_answers_gives_504101(hub: Hub, device_client):
    did = unique_id("mute")
    client = device_client(hub.device_cs(did))
    seen: list = []
    client.connect()
    client.on_method_request_received = seen.append  # receives, never answers
    rm = hub.registry()
    started = time.monotonic()
    with pytest.raises(HttpOperationError) as info:
        _invoke(rm, did, response_timeout_in_seconds=5)
    elapsed = time.monotonic() - started
    assert_iothub_error(info.value.response, 504, 504101, "GatewayTimeout")
    assert 4.5 <= elapsed <= 20, f"504 after {elapsed:.1f}s, expected about 5s"
    assert [r.name for r in seen] == ["ping"], "the request must have reached the device"


def test_device_status_and_payload_pass_through(hub: Hub, device_client):
    from azure.iot.device import MethodResponse

    did = unique_id("st")
    client = device_client(hub.device_cs(did))
    client.connect()

    def handler(request) -> None:
        client.send_method_response(
            MethodResponse.create_from_method_request(
                request, 418, {"echo": request.payload, "name": request.name}
            )
        )

    client.on_method_request_received = handler
    res = sdk_call(
        hub.registry().invoke_device_method,
        did,
        CloudToDeviceMethod(method_name="brew", payload={"cups": 2, "list": [1, "a", None]}),
    )
    # The device's status travels in the body; HTTP stays 200.
    assert res.status == 418
    assert res.payload == {"echo": {"cups": 2, "list": [1, "a", None]}, "name": "brew"}


@pytest.mark.parametrize("transport", ["mqtt", "websockets"])
def test_wrong_device_key_is_credential_error(hub: Hub, device_client, transport):
    from azure.iot.device.exceptions import CredentialError

    did = unique_id("bad")
    hub.device_cs(did)
    client = device_client(hub.device_cs_for(did, random_key()), websockets=transport == "websockets")
    with pytest.raises(CredentialError):
        client.connect()


def test_disabled_device_is_credential_error(hub: Hub, device_client):
    from azure.iot.device.exceptions import CredentialError

    did = unique_id("dis")
    cs = hub.device_cs(did, status="disabled")
    client = device_client(cs)
    with pytest.raises(CredentialError):
        client.connect()


def test_sas_renewal_reconnects_and_methods_still_arrive(hub: Hub, device_client):
    did = unique_id("ttl")
    # Renewal fires 120 s before expiry: with a 130 s token, about 10 s after creation.
    client = device_client(hub.device_cs(did), sastoken_ttl=130)
    changes: list[bool] = []
    lock = threading.Lock()

    def on_state_change() -> None:
        with lock:
            changes.append(client.connected)

    client.on_connection_state_change = on_state_change
    client.connect()
    calls: list = []
    _answering(client, calls)
    rm = hub.registry()
    assert _invoke_ok(rm, did).status == 200

    # A renewal is a disconnect followed by a connect with a new token.
    wait_until(
        lambda: changes.count(False) >= 1 and changes[-1] is True and client.connected,
        timeout=40,
        what="token renewal reconnect",
    )
    res = _invoke_ok(rm, did)
    assert res.status == 200 and res.payload == RESPONSE
    assert len(calls) == 2


def test_hub_restart_keeps_method_subscription(fresh_hub: Hub, device_client):
    hub = fresh_hub
    did = unique_id("rs")
    client = device_client(hub.device_cs(did), connection_retry_interval=2)
    client.connect()
    _answering(client)
    rm = hub.registry()
    assert _invoke_ok(rm, did).status == 200

    assert hub.restart() == 0
    wait_until(lambda: client.connected, timeout=40, what="device SDK reconnect after hub restart")
    # The SDK sends no SUBSCRIBE after reconnecting; the hub must have kept it.
    res = sdk_call(
        hub.registry().invoke_device_method,
        did,
        CloudToDeviceMethod(method_name="ping", payload=None, connect_timeout_in_seconds=10),
    )
    assert res.status == 200 and res.payload == RESPONSE


def test_connection_state_shows_in_registry(hub: Hub, device_client):
    did = unique_id("cs")
    rm = hub.registry()
    client = device_client(hub.device_cs(did))
    assert rm.get_device(did).connection_state == "Disconnected"
    client.connect()
    assert rm.get_device(did).connection_state == "Connected"
    assert rm.get_service_statistics().connected_device_count >= 1
    client.disconnect()
    wait_until(
        lambda: rm.get_device(did).connection_state == "Disconnected", timeout=10, what="Disconnected state"
    )
