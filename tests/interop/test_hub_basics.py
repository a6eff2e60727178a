"""The hub process contract: health, dev PKI, access policies, connection strings, signals."""

from __future__ import annotations

import base64
import ipaddress
import signal
import socket
import ssl

import pytest
import requests

from harness import POLICIES, Hub, ServiceCredentials


def test_health_answers_200_without_auth(hub: Hub):
    r = requests.get(f"https://{hub.ip}/health", timeout=10)
    assert r.status_code == 200, r.text


def _peer_sans(ip: str, port: int, cafile: str, server_hostname: str) -> set[tuple[str, str]]:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((ip, port), timeout=10) as tcp:
        with ctx.wrap_socket(tcp, server_hostname=server_hostname) as tls:
            cert = tls.getpeercert()
    sans: set[tuple[str, str]] = set()
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "IP Address":
            value = str(ipaddress.ip_address(value.strip()))
        sans.add((kind, value))
    return sans


@pytest.mark.parametrize("port_attr", ["https_port", "mqtt_port"])
def test_server_certificate_sans_verify_against_dev_ca(hub: Hub, port_attr: str):
    port = getattr(hub, port_attr)
    # server_hostname = the IP: no SNI, IP SAN checked (what the device SDK does).
    sans = _peer_sans(hub.ip, port, str(hub.ca_pem), hub.ip)
    for expected in [
        ("DNS", "localhost"),
        ("IP Address", "127.0.0.1"),
        ("IP Address", "::1"),
        ("IP Address", hub.ip),
    ]:
        assert expected in sans, f"SAN {expected} missing from {sorted(sans)}"
    # The same certificate must also verify when dialed by name.
    assert ("DNS", "localhost") in _peer_sans(hub.ip, port, str(hub.ca_pem), "localhost")


def test_tls_files_created_in_data_dir(hub: Hub):
    ca = hub.ca_pem.read_text()
    bundle = hub.ca_bundle.read_text()
    assert ca.count("BEGIN CERTIFICATE") == 1, "ca.pem must hold exactly the dev CA"
    assert ca.strip() in bundle, "ca-bundle.pem must contain the dev CA"
    # System roots are in the bundle too (any Debian/CI machine has some).
    assert bundle.count("BEGIN CERTIFICATE") >= 2, "ca-bundle.pem holds no system roots"


def test_every_policy_has_a_connection_string(hub: Hub):
    keys = {}
    for policy in POLICIES:
        creds = ServiceCredentials.parse(hub.connection_string_cli(policy))
        assert creds.host == hub.ip
        assert creds.policy == policy
        assert len(base64.b64decode(creds.key, validate=True)) >= 16
        keys[policy] = creds.key
    assert len(set(keys.values())) == len(POLICIES), "policies must not share keys"
    default = ServiceCredentials.parse(hub.connection_string_cli(None))
    assert default.policy == "iothubowner" and default.key == keys["iothubowner"]


def test_https_port_other_than_443_appears_in_hostname(hub_factory):
    h = hub_factory(https_port=8443)
    cs = h.connection_string_cli("iothubowner")
    assert ServiceCredentials.parse(cs).host == f"{h.ip}:8443", cs
    assert requests.get(f"https://{h.ip}:8443/health", timeout=10).status_code == 200
    # The service SDK accepts HostName=host:port: it signs sr=quote_plus("ip:8443").
    rm = h.registry(cs=cs)
    devices = rm.get_devices()
    assert rm.recorder.last_call()[0] == "GET" and rm.recorder.last == 200
    assert devices == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_gracefully_with_exit_0(hub_factory, sig):
    h = hub_factory()
    assert h.stop(sig) == 0, h.log_tail()
    assert not h.running
