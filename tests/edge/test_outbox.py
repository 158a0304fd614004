"""The outbox over the spool and the in-memory broker: what goes out when, what leaves the
spool only on a PUBACK, what a restarted gateway sends, and what is counted."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge import spool as sp
from edge.metrics import EdgeMetrics
from edge.outbox import Outbox
from edge.spool import Spool
from fedcore.transport.base import (
    Connected,
    Disconnected,
    MessageReceived,
    PublishAcknowledged,
    TransportEvent,
)
from fedcore.transport.memory import MemoryBroker, MemoryTransport

UPDATE = "fg/f/t/update/gw1"
STATUS = "fg/f/status/gw1"


class Gateway:
    """An outbox fed by its transport's events the way the runtime's loop feeds it: queued,
    then handled one by one on the caller's thread."""

    def __init__(self, broker: MemoryBroker, state: Path, max_entries: int = 100,
                 metrics: EdgeMetrics | None = None) -> None:
        self.queue: list[TransportEvent] = []
        self.transport = MemoryTransport(broker, "gw1", report_acks=True)
        self.outbox = Outbox(self.transport, Spool(state, max_entries, 1 << 30), metrics)
        self.transport.start(self.queue.append)

    def pump(self) -> None:
        while self.queue:
            event = self.queue.pop(0)
            if isinstance(event, Connected):
                self.outbox.on_connected()
            elif isinstance(event, Disconnected):
                self.outbox.on_disconnected()
            elif isinstance(event, PublishAcknowledged):
                self.outbox.on_acknowledged(event)

    def send(self, n: int, first: int = 0, resend: bool = False) -> None:
        for i in range(first, first + n):
            self.outbox.publish(UPDATE, f"update {i}".encode(), kind="update", round=i,
                                message_id=f"id-{i}", resend=resend)
        self.pump()


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def received(broker: MemoryBroker) -> Iterator[list[bytes]]:
    got: list[bytes] = []
    sub = MemoryTransport(broker, "aggregator")
    sub.start(lambda e: got.append(e.payload) if isinstance(e, MessageReceived) else None)
    sub.subscribe("fg/#")
    yield got


def spooled(state: Path) -> list[str]:
    return [e.message_id for e in sp.read(state).entries]


def test_what_is_made_offline_goes_out_in_order_on_connect_and_leaves_on_the_puback(
        broker: MemoryBroker, received: list[bytes], tmp_path: Path) -> None:
    broker.refuse_connections("broker down", client_id="gw1")
    gw = Gateway(broker, tmp_path)
    gw.send(3)
    assert received == [] and spooled(tmp_path) == ["id-0", "id-1", "id-2"]
    broker.accept_connections("gw1")
    gw.transport.reconnect()
    gw.pump()
    assert received == [b"update 0", b"update 1", b"update 2"]
    assert spooled(tmp_path) == [] and (tmp_path / sp.FILE).stat().st_size == 0


def test_spool_across_a_restart(broker: MemoryBroker, received: list[bytes], tmp_path: Path) -> None:
    broker.refuse_connections("broker down", client_id="gw1")
    first = Gateway(broker, tmp_path)
    first.send(2)
    first.transport.kill()  # the process dies: nothing but the spool remembers the updates
    broker.accept_connections("gw1")
    second = Gateway(broker, tmp_path)
    second.pump()
    assert received == [b"update 0", b"update 1"]
    assert spooled(tmp_path) == []


def test_a_message_in_flight_when_the_link_drops_is_not_sent_twice(
        broker: MemoryBroker, received: list[bytes], tmp_path: Path) -> None:
    gw = Gateway(broker, tmp_path)
    gw.pump()
    gw.transport.drop_connection()  # the loop has not seen it yet: the outbox hands the
    gw.outbox.publish(UPDATE, b"in flight", kind="update", round=1, message_id="id-1")
    gw.transport.reconnect()  # transport the message, which resends it after reconnecting
    gw.pump()
    assert received == [b"in flight"] and spooled(tmp_path) == []


def test_unacknowledged_messages_are_sent_again_after_a_restart_with_the_same_bytes(
        broker: MemoryBroker, received: list[bytes], tmp_path: Path) -> None:
    gw = Gateway(broker, tmp_path)
    gw.pump()
    gw.outbox.publish(UPDATE, b"sent, no ack seen", kind="update", round=1, message_id="id-1")
    gw.transport.kill()  # killed before the PUBACK was handled: the spool still holds it
    assert spooled(tmp_path) == ["id-1"]
    Gateway(broker, tmp_path).pump()
    assert received == [b"sent, no ack seen"] * 2  # the receiver drops the copy by its id


def test_a_full_spool_drops_the_oldest_counted_in_the_metrics(
        broker: MemoryBroker, received: list[bytes], tmp_path: Path) -> None:
    metrics = EdgeMetrics(0)
    try:
        broker.refuse_connections("broker down", client_id="gw1")
        gw = Gateway(broker, tmp_path, max_entries=2, metrics=metrics)
        gw.send(5)
        assert spooled(tmp_path) == ["id-3", "id-4"]
        assert metrics.spool_dropped.value(reason="full") == 3
        assert metrics.spool_entries.value() == 2 and metrics.spool_bytes.value() > 0
        url = f"http://127.0.0.1:{metrics.server.port}/metrics"
        page = urllib.request.urlopen(url, timeout=5).read().decode()
        assert 'fedgate_edge_spool_dropped_total{reason="full"} 3' in page
        broker.accept_connections("gw1")
        gw.transport.reconnect()
        gw.pump()
        assert received == [b"update 3", b"update 4"]
        assert metrics.spool_entries.value() == 0 and metrics.spool_bytes.value() == 0
    finally:
        metrics.close()


def test_a_message_the_broker_refuses_leaves_the_spool_counted(tmp_path: Path) -> None:
    broker = MemoryBroker(authorize=lambda client, action, topic: "forbidden" not in topic)
    gw = Gateway(broker, tmp_path)
    gw.pump()
    gw.outbox.publish("fg/f/t/forbidden/gw1", b"x", kind="update", round=1, message_id="id-1")
    gw.pump()
    assert spooled(tmp_path) == [] and gw.outbox.spool is not None
    assert gw.outbox.spool.dropped == {"refused": 1}


def test_only_the_newest_status_waits_and_it_goes_before_the_spool(
        broker: MemoryBroker, received: list[bytes], tmp_path: Path) -> None:
    broker.refuse_connections("broker down", client_id="gw1")
    gw = Gateway(broker, tmp_path)
    gw.outbox.publish_latest(STATUS, b"status 1")
    gw.send(1)
    gw.outbox.publish_latest(STATUS, b"status 2")
    broker.accept_connections("gw1")
    gw.transport.reconnect()
    gw.pump()
    assert received == [b"status 2", b"update 0"]
    assert spooled(tmp_path) == []  # the status never touches the disk


def test_a_message_already_spooled_is_not_spooled_again(
        broker: MemoryBroker, received: list[bytes], tmp_path: Path) -> None:
    broker.refuse_connections("broker down", client_id="gw1")
    gw = Gateway(broker, tmp_path)
    gw.send(1)
    gw.send(1, resend=True)  # the participant re-sends its cached update: same message id
    assert spooled(tmp_path) == ["id-0"]
    gw.send(1)  # not a resend (parts of one message may share an id): spooled
    assert spooled(tmp_path) == ["id-0", "id-0"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs")
    mount = tmp_path / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_sends_from_memory_and_spools_again_when_there_is_room(
        broker: MemoryBroker, received: list[bytes], small_disk: Path) -> None:
    broker.refuse_connections("broker down", client_id="gw1")
    gw = Gateway(broker, small_disk)
    gw.send(2)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # no room left for the next record
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    big = b"x" * 20_000
    gw.outbox.publish(UPDATE, big, kind="update", round=2, message_id="id-big")
    assert gw.outbox.spool is not None and gw.outbox.spool.dropped == {"disk_error": 1}
    assert spooled(small_disk) == ["id-0", "id-1"]  # the failed write left no torn record
    filler.unlink()
    gw.send(1, first=3)
    assert spooled(small_disk) == ["id-0", "id-1", "id-3"]
    broker.accept_connections("gw1")
    gw.transport.reconnect()
    gw.pump()
    # the one that could not be spooled went from memory (the transport's queue), after the
    # spooled ones were handed over on connect
    assert sorted(received) == sorted([b"update 0", b"update 1", big, b"update 3"])
    assert spooled(small_disk) == []
