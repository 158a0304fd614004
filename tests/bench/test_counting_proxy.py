"""The benchmark's counting proxy forwards MQTT unchanged and counts every byte exactly."""

from __future__ import annotations

import importlib.util
import socket
import sys
import time
from pathlib import Path
from types import ModuleType

from fedgate.broker import RunningBroker

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("counting_proxy", ROOT / "bench" / "counting_proxy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["counting_proxy"] = module
    spec.loader.exec_module(module)
    return module


cp = _load()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _s(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _connect(client_id: str) -> bytes:  # MQTT 3.1.1, clean session, keep-alive 60
    return _packet(0x10, _s("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + _s(client_id))


def _connect_v5(client_id: str) -> bytes:  # with a Session Expiry Interval property
    props = bytes([0x11]) + (30).to_bytes(4, "big")
    return _packet(0x10, _s("MQTT") + bytes([5, 0x02]) + (60).to_bytes(2, "big")
                   + _varint(len(props)) + props + _s(client_id))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"connection closed after {len(got)} of {n} bytes"
        got += chunk
    return got


def _wait(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_framer_splits_packets_fed_byte_by_byte() -> None:
    topic = "fg/f/t/update/gw0"
    publish = _packet(0x32, _s(topic) + b"\x00\x07" + b"x" * 300)  # QoS 1, 2-byte length
    stream = _connect("abc") + publish + _packet(0xC0, b"")
    for step in (1, 3, len(stream)):
        framer = cp.MqttFramer()
        packets = []
        for i in range(0, len(stream), step):
            packets += framer.feed(stream[i:i + step])
        assert [p.kind for p in packets] == ["CONNECT", "PUBLISH", "PINGREQ"]
        assert [p.size for p in packets] == [len(_connect("abc")), len(publish), 2]
        assert packets[1].topic == topic
        assert cp.connect_client_id(packets[0].raw) == "abc"
    assert cp.connect_client_id(_connect_v5("gw-7")) == "gw-7"


def test_proxy_forwards_and_counts_both_directions_exactly(mosquitto: RunningBroker) -> None:
    proxy = cp.CountingProxy(mosquitto.port).start()
    try:
        sent = received = 0
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            def send(data: bytes) -> None:
                nonlocal sent
                sock.sendall(data)
                sent += len(data)

            def recv(n: int) -> bytes:
                nonlocal received
                data = _recv_exactly(sock, n)
                received += len(data)
                return data

            send(_connect("proxy-test"))
            assert recv(4) == b"\x20\x02\x00\x00"  # CONNACK, accepted
            topic = "test/counting-proxy/echo"
            subscribe = _packet(0x82, b"\x00\x01" + _s(topic) + b"\x01")  # id 1, QoS 1
            send(subscribe)
            assert recv(5) == b"\x90\x03\x00\x01\x01"  # SUBACK granted QoS 1
            payload = bytes(range(256)) * 8
            publish = _packet(0x32, _s(topic) + b"\x00\x02" + payload)  # QoS 1, id 2
            send(publish)
            # the broker's PUBACK and our own message coming back, in either order
            got = recv(4 + len(publish))
            assert b"\x40\x02\x00\x02" in got
            assert payload in got
            echoed_id = got[got.index(_s(topic)) + len(_s(topic)):][:2]
            send(_packet(0x40, echoed_id))  # PUBACK the delivered copy
            send(_packet(0xC0, b""))  # PINGREQ
            assert recv(2) == b"\xd0\x00"  # PINGRESP
            send(_packet(0xE0, b""))  # DISCONNECT
        _wait(lambda: all(c.closed for c in proxy.connections()))
        [conn] = proxy.connections()
        assert (conn.up, conn.down) == (sent, received)
        assert conn.client_id == "proxy-test"
        assert proxy.by_client() == {"proxy-test": (sent, received)}
        assert conn.packets_up == {"CONNECT": 1, "SUBSCRIBE": 1, "PUBLISH": 1, "PUBACK": 1,
                                   "PINGREQ": 1, "DISCONNECT": 1}
        assert conn.packets_down == {"CONNACK": 1, "SUBACK": 1, "PUBACK": 1, "PUBLISH": 1,
                                     "PINGRESP": 1}
        [(mark_topic, up_at, _)] = conn.marks
        assert mark_topic == topic
        assert up_at == len(_connect("proxy-test")) + len(subscribe) + len(publish)
    finally:
        proxy.stop()
