"""X.509 sign-in with the official Python SDKs, unchanged (issue 13, section 3).

Devices and modules registered with azure-iot-hub 2.7.0 (`create_device_with_x509`,
`create_device_with_certificate_authority`, `create_module_with_x509`,
`create_module_with_certificate_authority`) sign in with azure-iot-device 2.14.0's
`create_from_x509_certificate(X509(cert, key), hostname, device_id[, module_id])` over MQTT/TLS
(8883) and MQTT over WebSockets (443); a direct method and a reported-properties patch work. A
certificate that is not registered, one that expired, and a CA-signed one issued for another
device id are refused: the SDK's connect() raises. The CA is the hub's own development CA,
registered and verified (proof of possession) with the `twinhub ca` and `twinhub cert` commands;
every certificate comes from `twinhub cert device`.

One hub serves the whole file; every test works on identities of its own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from azure.iot.hub.models import CloudToDeviceMethod

import harness
from harness import Hub, sdk_call, shutdown_bounded, unique_id, wait_until

pytestmark = pytest.mark.device

TRANSPORTS = ["mqtt", "websockets"]
CONNECT_REFUSAL_TIMEOUT_S = 20.0
CA_NAME = "devca"


class Cert:
    """A certificate and key file `twinhub cert device` wrote, with its thumbprints."""

    def __init__(self, out: str) -> None:
        pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in pairs}
        self.cert = fields["certificate"]
        self.key = fields["key"]
        self.sha1 = fields["sha1"]
        self.sha256 = fields["sha256"]


def issue(hub: Hub, identity: str, *flags: str) -> Cert:
    """`twinhub cert device IDENTITY` into a directory of its own (the hub's dev CA signs unless
    --self-signed)."""
    out = hub.workdir / "certs" / unique_id("c")
    return Cert(
        hub.cli("cert", "device", identity, "--out", str(out), "--data-dir", str(hub.data_dir), *flags)
    )


@pytest.fixture(scope="module")
def verified_ca(hub: Hub) -> str:
    """The hub's dev CA registered as CA_NAME and verified through the CLI, as a user would."""
    dd = ("--data-dir", str(hub.data_dir))
    hub.cli("ca", "add", CA_NAME, "--cert", str(hub.ca_pem), *dd)
    code = hub.cli("ca", "verification-code", CA_NAME, *dd).strip()
    assert len(code) == 40, code
    out = hub.workdir / "verification"
    path = hub.cli("cert", "verification", code, "--out", str(out), *dd).strip()
    shown = hub.cli("ca", "verify", CA_NAME, "--cert", path, *dd)
    assert '"isVerified": true' in shown, shown
    return CA_NAME




@pytest.fixture
def x509_client(hub: Hub) -> Iterator[Callable[..., Any]]:
    """x509_client(device_id, cert, module_id=None, **kwargs): an IoTHubDeviceClient (or
    IoTHubModuleClient) from a certificate, trusting the hub through server_verification_cert;
    all are shut down at teardown."""
    from azure.iot.device import X509, IoTHubDeviceClient, IoTHubModuleClient

    ca = hub.ca_pem.read_text()
    clients: list[Any] = []

    def make(device_id: str, cert: Cert, module_id: str | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("server_verification_cert", ca)
        x509 = X509(cert_file=cert.cert, key_file=cert.key)
        if module_id is None:
            client = IoTHubDeviceClient.create_from_x509_certificate(
                x509, hostname=hub.hostname, device_id=device_id, **kwargs
            )
        else:
            client = IoTHubModuleClient.create_from_x509_certificate(
                x509, hostname=hub.hostname, device_id=device_id, module_id=module_id, **kwargs
            )
        clients.append(client)
        return client

    yield make
    for client in clients:
        shutdown_bounded(client)


def connect_refused(client) -> BaseException:
    return harness.connect_refused(client, CONNECT_REFUSAL_TIMEOUT_S)


def answering(client, calls: list) -> None:
    """Answers every method request with 200 and {"name", "payload"}."""
    from azure.iot.device import MethodResponse

    def handler(request) -> None:
        calls.append(request)
        client.send_method_response(
            MethodResponse.create_from_method_request(
                request, 200, {"name": request.name, "payload": request.payload}
            )
        )

    client.on_method_request_received = handler


def exercise(rm, client, device_id: str, module_id: str | None = None) -> None:
    """A direct method and a reported patch through a connected certificate session."""
    calls: list = []
    answering(client, calls)
    method = CloudToDeviceMethod(method_name="ping", payload={"n": 7}, response_timeout_in_seconds=20)
    # The SDK subscribes to methods when the handler is set; the first call may race it.
    deadline = time.monotonic() + 15
    while True:
        try:
            if module_id is None:
                result = rm.invoke_device_method(device_id, method)
            else:
                result = rm.invoke_device_module_method(device_id, module_id, method)
            break
        except Exception:  # noqa: BLE001 - retried until the subscription is in place
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert result.status == 200
    assert result.payload == {"name": "ping", "payload": {"n": 7}}
    marker = unique_id("fw")
    client.patch_twin_reported_properties({"fw": marker})

    def reported() -> bool:
        twin = (
            rm.get_twin(device_id) if module_id is None else rm.get_module_twin(device_id, module_id)
        )
        return twin.properties.reported.get("fw") == marker

    wait_until(reported, 10, what="the reported patch in the twin")


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_self_signed_device_signs_in_by_thumbprint(rm, hub: Hub, x509_client, transport):
    did = unique_id("ss")
    cert = issue(hub, did, "--self-signed")
    dev = sdk_call(rm.create_device_with_x509, did, cert.sha1, None, "enabled")
    assert dev.authentication.type == "selfSigned"
    assert dev.authentication.x509_thumbprint.primary_thumbprint == cert.sha1
    client = x509_client(did, cert, websockets=transport == "websockets")
    client.connect()
    exercise(rm, client, did)


def test_self_signed_device_by_sha256_secondary_thumbprint(rm, hub: Hub, x509_client):
    did = unique_id("ss256")
    cert = issue(hub, did, "--self-signed")
    other = issue(hub, did, "--self-signed")
    sdk_call(rm.create_device_with_x509, did, other.sha1, cert.sha256, "enabled")
    client = x509_client(did, cert)
    client.connect()
    exercise(rm, client, did)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ca_signed_device_signs_in(rm, hub: Hub, x509_client, verified_ca, transport):
    did = unique_id("ca")
    cert = issue(hub, did)
    dev = sdk_call(rm.create_device_with_certificate_authority, did, "enabled")
    assert dev.authentication.type == "certificateAuthority"
    client = x509_client(did, cert, websockets=transport == "websockets")
    client.connect()
    exercise(rm, client, did)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unregistered_certificate_is_refused(rm, hub: Hub, x509_client, transport):
    did = unique_id("wrong")
    registered = issue(hub, did, "--self-signed")
    stranger = issue(hub, did, "--self-signed")
    sdk_call(rm.create_device_with_x509, did, registered.sha1, None, "enabled")
    client = x509_client(
        did, stranger, websockets=transport == "websockets", connection_retry=False
    )
    connect_refused(client)


def test_expired_certificate_is_refused(rm, hub: Hub, x509_client):
    did = unique_id("old")
    expired = issue(hub, did, "--self-signed", "--expired")
    sdk_call(rm.create_device_with_x509, did, expired.sha1, None, "enabled")
    connect_refused(x509_client(did, expired, connection_retry=False))
    assert "expired" in hub.log_tail(400)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ca_certificate_of_another_device_is_refused(
    rm, hub: Hub, x509_client, verified_ca, transport
):
    did, other = unique_id("mine"), unique_id("theirs")
    sdk_call(rm.create_device_with_certificate_authority, did, "enabled")
    sdk_call(rm.create_device_with_certificate_authority, other, "enabled")
    theirs = issue(hub, other)
    client = x509_client(did, theirs, websockets=transport == "websockets", connection_retry=False)
    connect_refused(client)
    assert "CN mismatch" in hub.log_tail(400)


def test_rotating_the_thumbprint_revokes_the_old_certificate(rm, hub: Hub, x509_client):
    """update_device_with_x509 to a new thumbprint closes the session of the old certificate,
    which is refused from then on; the new one signs in."""
    did = unique_id("rot")
    old, new = issue(hub, did, "--self-signed"), issue(hub, did, "--self-signed")
    dev = sdk_call(rm.create_device_with_x509, did, old.sha1, None, "enabled")
    client = x509_client(did, old, connection_retry=False)
    client.connect()
    sdk_call(rm.update_device_with_x509, did, dev.etag, new.sha1, None, "enabled")
    wait_until(lambda: not client.connected, 15, what="the old certificate's session to close")
    connect_refused(x509_client(did, old, connection_retry=False))
    fresh = x509_client(did, new)
    fresh.connect()
    exercise(rm, fresh, did)


def test_sas_device_is_not_admitted_by_a_certificate(rm, hub: Hub, x509_client):
    did = unique_id("sas")
    sdk_call(rm.create_device_with_sas, did, None, None, "enabled")
    cert = issue(hub, did, "--self-signed")
    connect_refused(x509_client(did, cert, connection_retry=False))


def test_removing_the_ca_disconnects_its_devices(hub_factory):
    """On a hub of its own: the CA is removed under a connected device."""
    own = hub_factory()
    own.trust_process()
    rm = own.registry()
    dd = ("--data-dir", str(own.data_dir))
    own.cli("ca", "add", "own", "--cert", str(own.ca_pem), *dd)
    code = own.cli("ca", "verification-code", "own", *dd).strip()
    path = own.cli("cert", "verification", code, "--out", str(own.workdir / "v"), *dd).strip()
    own.cli("ca", "verify", "own", "--cert", path, *dd)
    did = unique_id("gone")
    sdk_call(rm.create_device_with_certificate_authority, did, "enabled")
    cert = issue(own, did)
    from azure.iot.device import X509, IoTHubDeviceClient

    client = IoTHubDeviceClient.create_from_x509_certificate(
        X509(cert.cert, cert.key),
        hostname=own.hostname,
        device_id=did,
        server_verification_cert=own.ca_pem.read_text(),
        connection_retry=False,
    )
    try:
        client.connect()
        assert client.connected
        own.cli("ca", "remove", "own", *dd)
        wait_until(lambda: not client.connected, 15, what="the session to close")
        connect_refused(client)
    finally:
        shutdown_bounded(client)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_module_signs_in_by_thumbprint(rm, hub: Hub, x509_client, transport):
    did, mid = unique_id("mdev"), unique_id("mod")
    sdk_call(rm.create_device_with_sas, did, None, None, "enabled")
    cert = issue(hub, f"{did}/{mid}", "--self-signed")
    mod = sdk_call(rm.create_module_with_x509, did, mid, None, cert.sha1, None)
    assert mod.authentication.type == "selfSigned"
    client = x509_client(did, cert, module_id=mid, websockets=transport == "websockets")
    client.connect()
    exercise(rm, client, did, mid)
    # The module's certificate does not sign its device in.
    connect_refused(x509_client(did, cert, connection_retry=False))


def test_ca_signed_module_signs_in_with_cn_device_slash_module(rm, hub: Hub, x509_client, verified_ca):
    did, mid = unique_id("mdev"), unique_id("mod")
    sdk_call(rm.create_device_with_sas, did, None, None, "enabled")
    sdk_call(rm.create_module_with_certificate_authority, did, mid, None)
    cert = issue(hub, f"{did}/{mid}")
    client = x509_client(did, cert, module_id=mid)
    client.connect()
    exercise(rm, client, did, mid)
    # A certificate for another module of the device is refused.
    other = unique_id("mod")
    sdk_call(rm.create_module_with_certificate_authority, did, other, None)
    connect_refused(x509_client(did, cert, module_id=other, connection_retry=False))


def test_certificate_files_are_what_the_cli_says(hub: Hub):
    cert = issue(hub, "any-id", "--self-signed")
    assert Path(cert.cert).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (Path(cert.key).stat().st_mode & 0o077) == 0
    assert len(cert.sha1) == 40 and len(cert.sha256) == 64
