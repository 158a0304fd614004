"""The services over a provisioned fleet: mTLS, generated ACL, signed messages, audit log.

A gateway's stolen-but-valid certificate still cannot get an unsigned or replayed update
accepted: the aggregator rejects it with a reason, counts it, and writes it to the
hash-chained audit log.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aggregator.audit import verify_chain
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedcore.protocol import codec
from fedcore.protocol.messages import Kind, ModelUpdate, RoundSummary
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, MessageReceived, TlsSettings
from fedcore.transport.paho import PahoTransport
from fedgate import provision
from fedgate.demo import start_secure_broker
from fedgate.demo_configs import DemoOptions, device_id, write_configs

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def client(url: str, bundle: Path, client_id: str) -> PahoTransport:
    tls = TlsSettings(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")
    return PahoTransport(url, client_id, clean_start=True, tls=tls, rng=random.Random(0))


def test_signed_fleet_runs_and_rejects_forged_and_replayed_updates(tmp_path: Path) -> None:
    dataset = load_dataset("synthetic", gateways=2, max_rows_per_unit=200)
    devices = [device_id(u) for u in dataset.units]
    fleet = tmp_path / "fleet"
    broker = start_secure_broker(fleet, "plant", devices, "t")
    url = broker.url.replace("mqtt://", "mqtts://")
    options = DemoOptions(dataset="synthetic", gateways=2, rounds=400, fleet="plant", task="t",
                          max_rows_per_unit=200)
    files = write_configs(tmp_path, url, options, dataset, default_spec(dataset),
                          default_train_config(dataset), fleet)
    topics = Topics("plant", "t")
    captured: queue.Queue[bytes] = queue.Queue()
    summaries: queue.Queue[RoundSummary] = queue.Queue()
    # A monitoring identity the broker's admin also lets read the updates. The broker binds
    # client ids to certificate names, so it cannot borrow the aggregator's identity.
    provision.provision_operator(fleet, "spy")
    with (fleet / "broker" / "acl").open("a") as acl:  # the spy's block is the file's last
        acl.write("topic read fg/plant/+/update/+\n")
    broker.stop()
    broker.start()
    spy = client(url, fleet / "operators" / "spy", "spy")

    def on_spy(event: object) -> None:
        if isinstance(event, Connected):
            spy.subscribe(topics.updates_filter())
            spy.subscribe(topics.metrics())
        elif isinstance(event, MessageReceived) and event.payload:
            if event.topic == topics.metrics():
                summaries.put(codec.decode_body(codec.decode(event.payload), RoundSummary))
            else:
                captured.put(event.payload)

    spy.start(on_spy)
    services = [(["aggregator", "run", "-c", str(files.aggregator)], "aggregator"),
                *[(["edge", "run", "-c", str(p)], u) for u, p in files.edges.items()]]

    def start(args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "fedgate", "-v", *args], stdout=log, stderr=log)

    procs: list[subprocess.Popen[bytes]] = []
    try:
        for args, name in services:
            procs.append(start(args, name))
        first = summaries.get(timeout=90)
        assert first.model_version >= 1
        genuine = captured.get(timeout=30)
        env = codec.decode(genuine)
        assert env.kind == "update" and len(env.signature) == 64

        # A stolen certificate used while its gateway is off: with the gateway on, the broker
        # gives the session to whichever connected last (client id = certificate name).
        victim = next(i for i, (_, name) in enumerate(services) if device_id(name) == env.sender)
        procs[victim].send_signal(signal.SIGTERM)
        procs[victim].wait(timeout=10)
        thief = client(url, fleet / "devices" / env.sender, f"{env.sender}-thief")
        thief.start(lambda e: None)
        time.sleep(1.0)
        update_topic = topics.update(env.sender)
        # 1. replay of a genuine signed update
        assert not thief.publish(update_topic, genuine, qos=1, wait=10).denied
        # 2. the same content re-enveloped without a signature, fresh id, current round
        body = codec.decode_body(env, ModelUpdate)
        forged = codec.make_envelope(Kind.UPDATE, env.fleet, env.task, env.round, env.sender,
                                     body, time.time())
        assert not thief.publish(update_topic, codec.encode(forged), qos=1, wait=10).denied
        # 3. a tampered signed update: same signature, other round number in the header
        tampered = codec.msgspec.structs.replace(env, round=env.round + 1)
        assert not thief.publish(update_topic, codec.encode(tampered), qos=1, wait=10).denied
        thief.stop()
        procs[victim] = start(*services[victim])

        audit = tmp_path / "aggregator-state" / "audit.jsonl"
        wanted = {"unsigned", "bad_signature"}
        replay = {"replayed", "stale_round"}  # same id in the window, or an older round
        deadline = time.monotonic() + 30
        reasons: set[str] = set()
        while time.monotonic() < deadline and not (wanted <= reasons and reasons & replay):
            time.sleep(0.5)
            entries = [json.loads(line) for line in audit.read_text().splitlines()]
            reasons = {e.get("reason") for e in entries if e["kind"] == "rejection"}
        assert wanted <= reasons and reasons & replay, reasons
        assert verify_chain(audit).ok
        # and the run goes on
        later = summaries.get(timeout=60)
        assert later.model_version > first.model_version
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        spy.stop()
        broker.stop()
