"""Hand-built MQTT 3.1.1 packets over a plain `ssl` socket, for protocol-violation tests.

No MQTT library is involved, so the tests can send exactly the malformed, oversized or
forbidden bytes a well-behaved client never would. Used by test_mqtt_raw.py and
test_durability.py; the encoders are checked against the spec examples in test_harness.py.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
import urllib.parse
from dataclasses import dataclass

from harness import device_sas

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

DEVICE_API_VERSION = "2019-10-01"


# ---- encoding ------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """MQTT Remaining Length encoding (1 to 4 bytes)."""
    if n < 0 or n > 268_435_455:
        raise ValueError(f"remaining length out of range: {n}")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | (flags & 0x0F)]) + varint(len(body)) + body


def connect_packet(
    client_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    keepalive: int = 60,
    clean_session: bool = False,
    level: int = 4,
    protocol_name: str = "MQTT",
) -> bytes:
    flags = 0
    if clean_session:
        flags |= 0x02
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    body = mqtt_str(protocol_name) + bytes([level, flags]) + struct.pack("!H", keepalive)
    body += mqtt_str(client_id)
    if username is not None:
        body += mqtt_str(username)
    if password is not None:
        body += mqtt_str(password)
    return packet(CONNECT, 0, body)


def publish_packet(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    pid: int | None = None,
    dup: bool = False,
    retain: bool = False,
) -> bytes:
    flags = (0x08 if dup else 0) | ((qos & 0x03) << 1) | (0x01 if retain else 0)
    body = mqtt_str(topic)
    if qos > 0:
        if pid is None:
            raise ValueError("QoS > 0 needs a packet id")
        body += struct.pack("!H", pid)
    return packet(PUBLISH, flags, body + payload)


def subscribe_packet(pid: int, filters: list[tuple[str, int]], *, flags: int = 0x02) -> bytes:
    body = struct.pack("!H", pid) + b"".join(mqtt_str(f) + bytes([q]) for f, q in filters)
    return packet(SUBSCRIBE, flags, body)


def puback_packet(pid: int) -> bytes:
    return packet(PUBACK, 0, struct.pack("!H", pid))


PINGREQ_PACKET = packet(PINGREQ, 0, b"")
DISCONNECT_PACKET = packet(DISCONNECT, 0, b"")


# ---- decoding ------------------------------------------------------------------------------


@dataclass
class Packet:
    ptype: int
    flags: int
    body: bytes

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    def publish_parts(self) -> tuple[str, int | None, bytes]:
        """(topic, packet id or None, payload) of a PUBLISH."""
        assert self.ptype == PUBLISH, self
        (tlen,) = struct.unpack_from("!H", self.body, 0)
        topic = self.body[2 : 2 + tlen].decode("utf-8")
        off = 2 + tlen
        pid = None
        if self.qos > 0:
            (pid,) = struct.unpack_from("!H", self.body, off)
            off += 2
        return topic, pid, self.body[off:]

    def packet_id(self) -> int:
        (pid,) = struct.unpack_from("!H", self.body, 0)
        return pid


def decode_packets(buf: bytearray) -> list[Packet]:
    """Removes and returns every complete packet at the front of buf (partial input stays)."""
    out: list[Packet] = []
    while len(buf) >= 2:
        mult, length, i = 1, 0, 1
        while True:
            if i >= len(buf):
                return out
            b = buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
            if i > 4:
                raise ValueError("malformed remaining length from server")
        if len(buf) < i + length:
            return out
        out.append(Packet(buf[0] >> 4, buf[0] & 0x0F, bytes(buf[i : i + length])))
        del buf[: i + length]
    return out


# ---- the connection ------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection."""


_CLOSED_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLError)


class RawMqtt:
    """A TLS connection to the hub's MQTT port, verified against the hub's dev CA."""

    def __init__(self, ip: str, port: int, cafile: str, timeout: float = 10.0) -> None:
        self.connected_at = time.monotonic()
        tcp = socket.create_connection((ip, port), timeout=timeout)
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.check_hostname = True
        # An IP as server_hostname sends no SNI and checks the IP SAN, like the device SDK.
        self.sock = ctx.wrap_socket(tcp, server_hostname=ip)
        self.handshake_done_at = time.monotonic()
        self.buf = bytearray()
        self.pending: list[Packet] = []
        self.received: list[Packet] = []
        self.closed = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "RawMqtt":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        """Sends bytes; raises Closed if the server already hung up."""
        try:
            self.sock.sendall(data)
        except _CLOSED_ERRORS as e:
            self.closed = True
            raise Closed(str(e)) from e

    def read_packet(self, timeout: float) -> Packet:
        """The next packet; raises Closed on EOF and TimeoutError when none comes in time."""
        deadline = time.monotonic() + timeout
        while True:
            self.pending.extend(decode_packets(self.buf))
            if self.pending:
                first = self.pending.pop(0)
                self.received.append(first)
                return first
            if self.closed:
                raise Closed("connection closed by server")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no packet within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except _CLOSED_ERRORS:
                chunk = b""
            if not chunk:
                self.closed = True
            else:
                self.buf += chunk

    def expect_closed(self, within: float) -> tuple[float, list[Packet]]:
        """Reads until the server closes; returns (monotonic time of close, packets seen).

        Fails when the connection is still open after `within` seconds.
        """
        seen: list[Packet] = []
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"server kept the connection open for {within}s (packets seen: {seen})")
            try:
                seen.append(self.read_packet(remaining))
            except Closed:
                return time.monotonic(), seen
            except TimeoutError:
                continue

    def wait_for(self, predicate, timeout: float) -> Packet:
        """Reads packets until one satisfies predicate; answers QoS 1 publishes on the way."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching packet within {timeout}s (seen: {self.received})")
            p = self.read_packet(remaining)
            if p.ptype == PUBLISH and p.qos == 1:
                self.send(puback_packet(p.publish_parts()[1] or 0))
            if predicate(p):
                return p

    def drain(self, duration: float) -> list[Packet]:
        """Everything that arrives within duration (stops early on close)."""
        seen: list[Packet] = []
        deadline = time.monotonic() + duration
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return seen
            try:
                p = self.read_packet(remaining)
            except TimeoutError:
                return seen
            if p.ptype == PUBLISH and p.qos == 1:
                self.send(puback_packet(p.publish_parts()[1] or 0))
            seen.append(p)


def device_username(host: str, device_id: str) -> str:
    return f"{host}/{device_id}/?api-version={DEVICE_API_VERSION}&DeviceClientType=" + urllib.parse.quote(
        "twinhub-interop-raw/1.0", safe=""
    )


def device_connect(
    conn: RawMqtt,
    host: str,
    device_id: str,
    key: str,
    *,
    keepalive: int = 60,
    client_id: str | None = None,
    se: int | None = None,
    level: int = 4,
    clean_session: bool = False,
) -> Packet:
    """Sends a device CONNECT with a SAS password and returns the CONNACK."""
    password = device_sas(host, device_id, key, se if se is not None else int(time.time()) + 3600)
    conn.send(
        connect_packet(
            client_id if client_id is not None else device_id,
            device_username(host, device_id),
            password,
            keepalive=keepalive,
            level=level,
            clean_session=clean_session,
        )
    )
    p = conn.read_packet(10)
    assert p.ptype == CONNACK, f"expected CONNACK, got {p}"
    assert len(p.body) == 2, f"CONNACK body must be 2 bytes: {p.body!r}"
    return p


def connack_code(p: Packet) -> int:
    return p.body[1]
