"""TCP_NODELAY on the live sockets of a running aggregator and gateway, plain and mTLS.

Nagle's algorithm holds a small MQTT write until the peer's delayed ACK (about 40 ms on
Linux) releases it: a round would wait for it at every hop. The services are built from
their config files exactly as ``fedgate aggregator run`` / ``fedgate edge run`` build them,
run a round against a real Mosquitto, and the socket under each transport (under the TLS
layer for mqtts) is asked for its TCP_NODELAY option.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.main import build_aggregator
from aggregator.runtime import AggregatorService
from edge.main import build_edge
from edge.runtime import EdgeService
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedgate.broker import RunningBroker
from fedgate.demo import start_secure_broker
from fedgate.demo_configs import DemoOptions, device_id, write_configs

pytestmark = pytest.mark.broker


def nodelay(service: AggregatorService | EdgeService) -> int:
    sock = service.transport._client.socket()  # type: ignore[attr-defined]  # the adapter's own
    assert isinstance(sock, socket.socket)  # ssl.SSLSocket is one: the option is on its TCP socket
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.fixture(params=["plain", "mtls"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path, mosquitto: RunningBroker) -> Iterator[tuple[Path, Path]]:
    dataset = load_dataset("synthetic", gateways=1, max_rows_per_unit=100)
    options = DemoOptions(dataset="synthetic", gateways=1, rounds=2, fleet="nodelay",
                          task=request.param, round_timeout_s=30.0)
    broker, fleet_dir, url = None, None, mosquitto.url
    if request.param == "mtls":
        fleet_dir = tmp_path / "fleet"
        broker = start_secure_broker(fleet_dir, options.fleet, [device_id(u) for u in dataset.units],
                                     options.task)
        url = f"mqtts://127.0.0.1:{broker.port}"
    try:
        files = write_configs(tmp_path, url, options, dataset, default_spec(dataset),
                              default_train_config(dataset), fleet_dir)
        yield files.aggregator, next(iter(files.edges.values()))
    finally:
        if broker is not None:
            broker.stop()


def test_the_running_services_set_tcp_nodelay(fleet: tuple[Path, Path]) -> None:
    aggregator, gateway = build_aggregator(fleet[0]), build_edge(fleet[1])
    threads = [threading.Thread(target=s.run, daemon=True) for s in (aggregator, gateway)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while aggregator.machine.version < 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # a committed round: both sockets carried the round's messages
        assert aggregator.machine.version >= 1, "no round was committed within 60 s"
        assert nodelay(aggregator) == 1
        assert nodelay(gateway) == 1
    finally:
        for service in (gateway, aggregator):
            service.stop()
        for t in threads:
            t.join(timeout=20)
