"""End to end over a real Mosquitto: the aggregator and gateway agents as processes.

Each test writes the same TOML configs an operator would (via the demo's writer), starts
`python -m fedgate aggregator run` and `python -m fedgate edge run` processes, and watches
the retained metrics topic like any subscriber.
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggregator import checkpoint as checkpoints
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedcore.protocol import codec
from fedcore.protocol.messages import GlobalModel, RoundSummary
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, MessageReceived
from fedcore.transport.paho import PahoTransport
from fedgate.demo_configs import DemoOptions, write_configs

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROWS = 300


class Run:
    """Configs for one aggregator and the synthetic data set's gateways, plus processes."""

    def __init__(self, tmp: Path, url: str, rounds: int, gateways: int, task: str,
                 min_participants: int | None = None, timeout_s: float = 60.0) -> None:
        self.tmp = tmp
        self.options = DemoOptions(dataset="synthetic", gateways=gateways, rounds=rounds,
                                   task=task, fleet="test", max_rows_per_unit=ROWS,
                                   round_timeout_s=timeout_s)
        dataset = load_dataset("synthetic", gateways=gateways, max_rows_per_unit=ROWS)
        self.files = write_configs(tmp, url, self.options, dataset, default_spec(dataset),
                                   default_train_config(dataset))
        quorum = gateways if min_participants is None else min_participants
        text = re.sub(r"min_participants = \d+", f"min_participants = {quorum}",
                      self.files.aggregator.read_text())
        self.files.aggregator.write_text(text)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.topics = Topics("test", task)
        self.summaries: queue.Queue[RoundSummary] = queue.Queue()
        self.observer = PahoTransport(url, f"observer-{task}", clean_start=True, rng=random.Random(1))

        def on_event(event: object) -> None:
            if isinstance(event, Connected):
                self.observer.subscribe(self.topics.metrics())
            elif isinstance(event, MessageReceived) and event.payload:
                self.summaries.put(codec.decode_body(codec.decode(event.payload), RoundSummary))

        self.observer.start(on_event)

    def start(self, name: str) -> None:
        if name == "aggregator":
            args = ["aggregator", "run", "-c", str(self.files.aggregator)]
        else:
            args = ["edge", "run", "-c", str(self.files.edges[name])]
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "fedgate", "-v", *args],
                                            stdout=log, stderr=log)

    def start_all(self) -> None:
        self.start("aggregator")
        for unit in self.files.edges:
            self.start(unit)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def next_summary(self, timeout: float = 90.0) -> RoundSummary:
        try:
            return self.summaries.get(timeout=timeout)
        except queue.Empty:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.tmp.glob("*.log"))
            raise AssertionError(f"no round summary within {timeout} s\n{logs}") from None

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.observer.stop()


@pytest.fixture
def run_factory(tmp_path: Path, mosquitto, request):
    runs: list[Run] = []

    def make(url: str | None = None, **kw) -> Run:
        task = f"{request.node.name[5:40]}-{os.getpid()}-{len(runs)}"
        run = Run(tmp_path, url or mosquitto.url, task=task, **kw)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()


def test_gateway_agents_complete_rounds(run_factory) -> None:
    run = run_factory(rounds=3, gateways=3)
    run.start_all()
    seen = [run.next_summary() for _ in range(3)]
    assert [s.round for s in seen] == [1, 2, 3]
    assert [s.model_version for s in seen] == [1, 2, 3]
    for s in seen:
        assert len(s.participants) == 3
        assert s.bytes_up > 0 and s.bytes_down > 0
        assert "eval_accuracy" in s.metrics
    assert (run.tmp / "aggregator-state" / "checkpoint.npz").exists()


def test_aggregator_killed_mid_round_resumes_from_checkpoint(run_factory) -> None:
    run = run_factory(rounds=4, gateways=3)
    run.start_all()
    first = run.next_summary()
    assert first.round == 1
    run.kill("aggregator")  # round 2 was announced and checkpointed; updates are in flight
    time.sleep(0.5)
    run.start("aggregator")
    # A summary is published at least once: killed between its publish and the marker that
    # says it went out, the aggregator publishes it again at start, unchanged.
    seen = {first.round: first}
    while len(seen) < 4:
        summary = run.next_summary()
        assert seen.setdefault(summary.round, summary) == summary  # a repeat is the same summary
    assert sorted(seen) == [1, 2, 3, 4]  # no round lost, none run twice
    assert [seen[r].model_version for r in (1, 2, 3, 4)] == [1, 2, 3, 4]


def test_gateway_disconnects_for_a_round_and_rejoins(run_factory) -> None:
    # rounds on this tiny data take ~0.1 s: plan plenty so the run outlasts a process restart
    run = run_factory(rounds=400, gateways=3, min_participants=2)
    run.start_all()
    # with a quorum of 2, an early round may close before the third agent is up
    while len(run.next_summary().participants) < 3:
        pass
    victim = next(iter(run.files.edges))
    run.kill(victim)  # no DISCONNECT: the broker publishes its last will (offline)
    without = run.next_summary()
    if len(without.participants) == 3:  # it had already sent this round's update
        without = run.next_summary()
    assert len(without.participants) == 2
    assert not any(p.endswith(victim) for p in without.participants)
    run.start(victim)
    for _ in range(400 - without.round):
        if any(p.endswith(victim) for p in run.next_summary().participants):
            break
    else:
        raise AssertionError(f"{victim} never took part again")


def test_broker_killed_mid_run_and_restarted_loses_no_round(run_factory, mosquitto_factory) -> None:
    broker = mosquitto_factory()  # no persistence: retained messages and sessions die with it
    run = run_factory(url=broker.url, rounds=200, gateways=3)
    run.start_all()
    before = run.next_summary()
    broker.kill()
    time.sleep(1.0)
    broker.start()  # same port; every client reconnects with its jittered backoff
    # the observer itself may miss summaries while it reconnects; wait until rounds move on
    while run.next_summary(timeout=120).round < before.round + 5:
        pass
    assert run.procs["aggregator"].poll() is None  # it rode the outage out, no restart
    # the aggregator's own record: every round committed once, in order, with all 3 gateways
    history = checkpoints.load(run.tmp / "aggregator-state").meta["history"]
    assert [h["round"] for h in history] == list(range(1, len(history) + 1))
    assert len(history) >= before.round + 5
    assert all(h["participants"] == 3 for h in history)


def test_after_a_broker_restart_the_retained_model_is_the_live_one(run_factory, mosquitto_factory) -> None:
    """A broker killed with persistence comes back with the retained state it saved last
    (here: rounds old) and the aggregator's session: the aggregator publishes its model
    again on every reconnect, so a subscriber reads the live version, also after the run."""
    broker = mosquitto_factory(persistence=True, extra_config="autosave_interval 3600")
    run = run_factory(url=broker.url, rounds=6, gateways=2)
    run.start_all()
    run.next_summary()
    broker.stop()  # a clean stop saves the retained state of now
    broker.start()
    state = run.tmp / "aggregator-state"
    deadline = time.monotonic() + 120
    while (saved := checkpoints.load(state)) is None or saved.meta["phase"] != "finished":
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.2)
    live = int(saved.meta["version"])
    broker.kill()  # no save: its file holds the state of the clean stop
    time.sleep(0.5)
    broker.start()
    deadline = time.monotonic() + 30
    while (retained := _retained_model_version(broker.url, run.topics)) != live:
        # the broker's saved copy until the aggregator is back (its jittered backoff)
        assert time.monotonic() < deadline, f"the broker still serves version {retained}, not {live}"
        time.sleep(0.5)


def _retained_model_version(url: str, topics: Topics) -> int | None:
    """What a new subscriber to the model topic gets first (None: nothing retained)."""
    got: queue.Queue[int] = queue.Queue()
    reader = PahoTransport(url, f"retained-reader-{os.getpid()}", clean_start=True, rng=random.Random(3))

    def on_event(event: object) -> None:
        if isinstance(event, Connected):
            reader.subscribe(topics.model())
        elif isinstance(event, MessageReceived) and event.payload and event.retained:
            got.put(codec.decode_body(codec.decode(event.payload), GlobalModel).version)

    reader.start(on_event)
    try:
        return got.get(timeout=3)
    except queue.Empty:
        return None
    finally:
        reader.stop()
