"""Spool across a restart, end to end: a gateway process makes its update while the broker
is down, is killed with SIGKILL, and after a restart sends that very update (same bytes,
same message id) once the broker is back. Real Mosquitto, real processes; the test reads
the spool file only to learn the message id it must then see on the wire."""

from __future__ import annotations

import json
import random
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge import spool as sp
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedcore.protocol import codec
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, MessageReceived
from fedcore.transport.paho import PahoTransport
from fedgate.broker import RunningBroker
from fedgate.demo_configs import DemoOptions, write_configs
from fedgate.processes import ProcessGroup, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROWS = 1000
EPOCHS = 1000  # local training of a few seconds: the window in which the broker dies


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[ProcessGroup]:
    """The services of this test, each stopped on every exit path."""
    with ProcessGroup(tmp_path / "logs") as group:
        yield group


def start(group: ProcessGroup, name: str, *args: str) -> None:
    group.start(name, [sys.executable, "-m", "fedgate", "-v", *args])


def wait_until(what: str, check: Callable[[], bool], group: ProcessGroup, timeout: float = 90.0) -> None:
    """Poll ``check``; fail naming ``what`` on timeout or when a service running now exits."""
    running = [name for name, child in group.children.items() if child.running]
    wait_for(what, lambda: check() or None, timeout, every=0.01, group=group, alive=running)


def trace_steps(state: Path) -> list[str]:
    try:
        lines = (state / "trace.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


@dataclass
class Fleet:
    """One aggregator and one gateway on a private broker, the gateway's update made while
    the broker is down and left only in its spool (the gateway killed)."""

    broker: RunningBroker
    aggregator: Path
    edge: Path
    state: Path
    gw: str
    topics: Topics
    spooled: sp.Entry
    trace_lines: int  # the gateway's trace lines before its restart


def spooled_fleet(tmp_path: Path, broker: RunningBroker, processes: ProcessGroup,
                  aggregator_trace: bool = False) -> Fleet:
    task = f"spool-{random.randrange(1 << 30)}"
    options = DemoOptions(dataset="synthetic", gateways=1, rounds=1, task=task, fleet="test",
                          max_rows_per_unit=ROWS, round_timeout_s=600)
    dataset = load_dataset("synthetic", gateways=1, max_rows_per_unit=ROWS)
    files = write_configs(tmp_path, broker.url, options, dataset, default_spec(dataset),
                          default_train_config(dataset))
    agg = re.sub(r"local_epochs = \d+", f"local_epochs = {EPOCHS}", files.aggregator.read_text())
    if aggregator_trace:
        agg = agg.replace("[state]\n", "[state]\ntrace = true\n")
    files.aggregator.write_text(agg)
    (device, edge_file), = files.edges.items()
    edge_toml = edge_file.read_text()
    state = Path(re.findall(r'^dir = "(.*)"$', edge_toml, re.M)[-1])
    edge_file.write_text(edge_toml.replace("[state]\n", "[state]\ntrace = true\n")
                         + "\n[spool]\nmax_entries = 50\nmax_bytes = 1048576\n")
    gw = f"gw-{device}"
    topics = Topics("test", task)

    start(processes, "aggregator", "aggregator", "run", "-c", str(files.aggregator))
    start(processes, "gateway", "edge", "run", "-c", str(edge_file))
    wait_until("the gateway starts training", lambda: "train_start" in trace_steps(state), processes)
    broker.kill()  # while it trains: its update has nowhere to go
    processes.stop("aggregator", signal.SIGKILL)  # nobody re-announces the round: only the spool can help
    wait_until("the update is spooled", lambda: any(e.kind == "update" for e in sp.read(state).entries),
               processes)
    assert "train_end" in trace_steps(state)
    processes.stop("gateway", signal.SIGKILL)  # power cut: paho's in-memory copy is gone
    (spooled,) = sp.read(state).entries
    assert spooled.kind == "update" and spooled.round == 1 and spooled.topic == topics.update(gw)
    return Fleet(broker, files.aggregator, edge_file, state, gw, topics, spooled,
                 len(trace_steps(state)))


def test_spool_across_a_restart(tmp_path: Path, mosquitto_factory, processes: ProcessGroup) -> None:
    fleet = spooled_fleet(tmp_path, mosquitto_factory(), processes)  # no broker persistence
    fleet.broker.start()  # same port, empty
    got: list[MessageReceived] = []
    subscriber = PahoTransport(fleet.broker.url, f"aggregator-side-{fleet.topics.task}",
                               clean_start=True, rng=random.Random(1))
    topic = fleet.topics.update(fleet.gw)

    def on_event(event: object) -> None:
        if isinstance(event, Connected):
            subscriber.subscribe(topic)
        elif isinstance(event, MessageReceived):
            got.append(event)

    subscriber.start(on_event)
    try:
        # the subscription is live once our own probe comes back on it
        wait_until("the subscriber is connected", lambda: subscriber.connected, processes)
        deadline = time.monotonic() + 30
        while not any(m.payload == b"probe" for m in got):
            assert time.monotonic() < deadline, "the probe never came back"
            subscriber.publish(topic, b"probe", qos=1, wait=5)
            time.sleep(0.2)
        start(processes, "gateway-restarted", "edge", "run", "-c", str(fleet.edge))
        updates = lambda: [m for m in got if m.payload != b"probe"]  # noqa: E731
        wait_until("the spooled update arrives", lambda: bool(updates()), processes)
        first = updates()[0]
        env = codec.decode(first.payload)
        assert env.kind == "update" and env.round == 1 and env.sender == fleet.gw
        assert env.message_id == fleet.spooled.message_id  # the aggregator can tell a resend
        assert first.payload == fleet.spooled.payload  # the signed bytes made before the kill
        # the broker's PUBACK lets it go: the spool is empty again
        wait_until("the spool is emptied", lambda: sp.read(fleet.state).entries == [], processes)
        log = processes.children["gateway-restarted"].output()
        assert "1 unsent (" in log
        assert "sending spooled messages: 1," in log
    finally:
        subscriber.stop()


def test_the_restarted_aggregator_commits_the_round_on_the_spooled_update(
        tmp_path: Path, mosquitto_factory, processes: ProcessGroup) -> None:
    """The aggregator resumes round 1 from its checkpoint; the restarted gateway's spooled
    update (signed before the kill) is accepted and closes the round before the gateway
    could have trained a new one for the re-announced round."""
    fleet = spooled_fleet(tmp_path, mosquitto_factory(), processes, aggregator_trace=True)
    fleet.broker.start()
    agg_state = fleet.aggregator.parent / "aggregator-state"
    published = len([s for s in trace_steps(agg_state) if s == "round_published"])
    start(processes, "aggregator-restarted", "aggregator", "run", "-c", str(fleet.aggregator))
    wait_until("the aggregator announces round 1 again",
               lambda: trace_steps(agg_state).count("round_published") > published, processes)
    start(processes, "gateway-restarted", "edge", "run", "-c", str(fleet.edge))
    wait_until("round 1 is fused", lambda: "fused" in trace_steps(agg_state), processes)
    # the gateway has not made another update since its restart: the round closed on the
    # spooled one (it would otherwise have waited for a new one, trained for seconds)
    since_restart = trace_steps(fleet.state)[fleet.trace_lines:]
    assert "update_published" not in since_restart
    sent = codec.decode(fleet.spooled.payload).timestamp
    received = [m for m in trace_marks(agg_state) if m["step"] == "update_received"]
    assert [(m["device"], m["round"], m["sent"]) for m in received] == [(fleet.gw, 1, sent)]


def trace_marks(state: Path) -> list[dict[str, Any]]:
    lines = (state / "trace.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]
