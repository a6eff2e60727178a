"""Self-tests of the harness helpers; they need no hub, so they run even before it exists.

A wrong SAS builder or packet encoder would make hub tests fail (or pass) for the wrong
reason, so each helper is checked against an independent source: the SDKs' own token
builders, paho's packet encoder, and the MQTT 3.1.1 spec examples.
"""

from __future__ import annotations

import os
import socket
import struct
import time
import urllib.parse
from types import SimpleNamespace

import pytest

import harness
import mqtt_raw
from harness import AddressAllocator, ServiceCredentials, error_codes_in


def test_service_sas_matches_the_service_sdk():
    from azure.iot.hub.sastoken import SasToken

    key = harness.random_key()
    sdk = SasToken("127.0.0.10:8443", key, "iothubowner", ttl=3600)
    ours = harness.service_sas("127.0.0.10:8443", "iothubowner", key, sdk.expiry_time)
    assert ours == str(sdk)
    assert "sr=127.0.0.10%3A8443&" in ours


def test_device_sas_matches_the_device_sdk():
    from azure.iot.device.common.auth.sastoken import RenewableSasToken
    from azure.iot.device.common.auth.signing_mechanism import SymmetricKeySigningMechanism

    key = harness.random_key()
    sdk = RenewableSasToken("127.0.0.10/devices/d-1", SymmetricKeySigningMechanism(key), ttl=3600)
    ours = harness.device_sas("127.0.0.10", "d-1", key, sdk.expiry_time)
    assert ours == str(sdk)


def test_expired_token_is_signed_correctly_but_in_the_past():
    key = harness.random_key()
    se = int(time.time()) - 600
    tok = harness.service_sas("h", "iothubowner", key, se)
    fields = dict(p.split("=", 1) for p in tok.removeprefix("SharedAccessSignature ").split("&"))
    assert int(fields["se"]) < time.time()
    expected = harness.sign(key, f"{fields['sr']}\n{fields['se']}")
    assert urllib.parse.unquote(fields["sig"]) == expected


def test_connection_string_parse_roundtrip():
    cs = "HostName=127.0.0.10:8443;SharedAccessKeyName=service;SharedAccessKey=YWJj+/=="
    creds = ServiceCredentials.parse(cs)
    assert (creds.host, creds.policy, creds.key) == ("127.0.0.10:8443", "service", "YWJj+/==")
    assert creds.connection_string() == cs
    with pytest.raises(AssertionError):
        ServiceCredentials.parse("HostName=h;DeviceId=d;SharedAccessKey=k")


@pytest.mark.parametrize(
    "n, encoded",
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2097151, b"\xff\xff\x7f"),
        (2097152, b"\x80\x80\x80\x01"),
        (268435455, b"\xff\xff\xff\x7f"),
    ],
)
def test_varint_matches_spec_table(n, encoded):
    assert mqtt_raw.varint(n) == encoded
    buf = bytearray(b"\x30" + encoded + b"x" * n) if n < 100_000 else None
    if buf is not None:
        (p,) = mqtt_raw.decode_packets(buf)
        assert len(p.body) == n and not buf


def _paho_capture():
    import paho.mqtt.client as paho

    client = paho.Client("d-1", clean_session=False, protocol=paho.MQTTv311)
    captured: list[bytes] = []

    def queue(command, packet, mid, qos, info=None):
        captured.append(bytes(packet))
        return 0

    client._packet_queue = queue  # the encoder's output, before any socket I/O
    client._sock = SimpleNamespace(close=lambda: None)  # _send_publish needs a socket
    return client, captured


def test_connect_packet_matches_paho():
    client, captured = _paho_capture()
    client.username_pw_set("127.0.0.10/d-1/?api-version=2019-10-01", "SharedAccessSignature sr=x&sig=y&se=1")
    client._send_connect(60)
    ours = mqtt_raw.connect_packet(
        "d-1", "127.0.0.10/d-1/?api-version=2019-10-01", "SharedAccessSignature sr=x&sig=y&se=1", keepalive=60
    )
    assert ours == captured[0]


def test_publish_and_subscribe_packets_match_paho():
    client, captured = _paho_capture()
    client._send_publish(7, b"$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"a":1}', qos=1, dup=True)
    ours = mqtt_raw.publish_packet(
        "$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"a":1}', qos=1, pid=7, dup=True
    )
    assert ours == captured[0]
    client._last_mid = 4  # paho hands out mid 5 next
    client._send_subscribe(False, [(b"$iothub/methods/POST/#", 1)])
    assert mqtt_raw.subscribe_packet(5, [("$iothub/methods/POST/#", 1)]) == captured[1]


def test_decode_keeps_partial_input():
    whole = mqtt_raw.publish_packet("t", b"abc", qos=1, pid=9) + mqtt_raw.PINGREQ_PACKET
    buf = bytearray(whole[:-1])
    (p,) = mqtt_raw.decode_packets(buf)
    assert p.publish_parts() == ("t", 9, b"abc")
    assert buf == bytearray(whole[len(whole) - 2 : -1])
    buf += whole[-1:]
    (ping,) = mqtt_raw.decode_packets(buf)
    assert ping.ptype == mqtt_raw.PINGREQ and not buf


def test_error_codes_found_in_both_layouts():
    registry = '{"Message":"ErrorCode:404001;DeviceNotFound","ExceptionMessage":"Tracking ID:ab"}'
    assert error_codes_in(registry) == {404001}
    top = '{"Message":"ErrorCode:DeviceNotFound;x","ExceptionMessage":"","errorCode":404001}'
    assert error_codes_in(top) == {404001}
    # Digit runs in ids are not codes.
    noise = (
        '{"Message":"ErrorCode:DeviceNotFound;Device err-590285c3 not found",'
        '"ExceptionMessage":"Tracking ID:453357ab"}'
    )
    assert error_codes_in(noise) == set()
    nested = '{"Message":"{\\"errorCode\\":404103,\\"message\\":\\"offline\\"}","ExceptionMessage":""}'
    assert error_codes_in(nested) == {404103}
    assert error_codes_in('{"Message":"ErrorCode:DeviceNotFound;no digits","ExceptionMessage":""}') == set()


def test_allocator_skips_an_address_whose_port_is_taken():
    probe = AddressAllocator(start=200)
    first = probe.allocate()
    # A fresh allocator starting at the same point must skip `first` while it is bound.
    with socket.socket() as s:
        s.bind((first, 8883))
        s.listen(1)
        assert not harness.port_free(first, 8883)
        again = AddressAllocator(start=200).allocate()
    assert again != first
    assert harness.port_free(first, 8883)


def test_hub_env_sets_trust_vars_and_removes_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("CURL_CA_BUNDLE", "/elsewhere.pem")
    monkeypatch.setenv("SSL_CERT_DIR", "/elsewhere")
    h = harness.Hub(binary=tmp_path / "none", ip="127.0.0.99", workdir=tmp_path)
    env = h.env()
    bundle = str(tmp_path / "data" / "tls" / "ca-bundle.pem")
    assert env["REQUESTS_CA_BUNDLE"] == bundle and env["SSL_CERT_FILE"] == bundle
    assert "CURL_CA_BUNDLE" not in env and "SSL_CERT_DIR" not in env


def test_process_trust_vars_have_no_overrides():
    assert "CURL_CA_BUNDLE" not in os.environ and "SSL_CERT_DIR" not in os.environ
    assert os.environ.get("REQUESTS_CA_BUNDLE") == os.environ.get("SSL_CERT_FILE")


def test_hub_process_env_restores_machine_trust_settings(monkeypatch):
    monkeypatch.setitem(harness._ORIGINAL_TRUST_ENV, "SSL_CERT_FILE", "/machine/bundle.pem")
    monkeypatch.setitem(harness._ORIGINAL_TRUST_ENV, "SSL_CERT_DIR", None)
    monkeypatch.setenv("SSL_CERT_FILE", "/some/hub/ca-bundle.pem")
    monkeypatch.setenv("SSL_CERT_DIR", "/x")
    env = harness._hub_process_env()
    assert env["SSL_CERT_FILE"] == "/machine/bundle.pem"
    assert "SSL_CERT_DIR" not in env


def test_missing_binary_fails_loudly(tmp_path):
    h = harness.Hub(binary=tmp_path / "no-such-twinhub", ip="127.0.0.99", workdir=tmp_path)
    with pytest.raises(harness.HubError, match="binary not found"):
        h.start()


def test_hub_start_fails_with_log_when_process_exits_early(tmp_path):
    fake = tmp_path / "fake-twinhub"
    fake.write_text("#!/bin/sh\necho 'fatal: cannot bind' >&2\nexit 3\n")
    fake.chmod(0o755)
    h = harness.Hub(binary=fake, ip="127.0.0.99", workdir=tmp_path / "w")
    with pytest.raises(harness.HubError) as info:
        h.start()
    assert "exited with code 3" in str(info.value) and "fatal: cannot bind" in str(info.value)


def test_struct_sanity_of_connack_parsing():
    p = mqtt_raw.Packet(mqtt_raw.CONNACK, 0, struct.pack("!BB", 0, 5))
    assert mqtt_raw.connack_code(p) == 5
