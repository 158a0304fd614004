"""The gateway agent's runtime on an in-memory broker: birth, training, update, LiteRT
inference and telemetry, clean goodbye - the real EdgeService, no network."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pytest

from edge.config import DataConfig, EdgeConfig
from edge.data import DatasetSource
from edge.runtime import EdgeService
from edge.security import EdgeSecurity
from edge.serving import ModelServer
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedcore.learning.models import init_params
from fedcore.protocol import codec
from fedcore.protocol.messages import (
    GlobalModel,
    Kind,
    ModelUpdate,
    RoundAnnouncement,
    Status,
    Telemetry,
)
from fedcore.protocol.tensors import encode_tensors
from fedcore.protocol.topics import Topics
from fedcore.service_config import BrokerConfig
from fedcore.transport.base import MessageReceived
from fedcore.transport.memory import MemoryBroker, MemoryTransport


def test_gateway_trains_publishes_and_runs_the_model_in_litert(tmp_path: Path) -> None:
    dataset = load_dataset("wind", max_rows_per_unit=1500)
    unit = dataset.units["R80711"]
    spec = default_spec(dataset)
    data = DatasetSource(unit.x_train, unit.y_train, unit.x_test, unit.y_test,
                         float(dataset.scaler.target_std), dataset.task)
    config = EdgeConfig(file="edge.toml", device="gw1", fleet="f", task="t",
                        broker=BrokerConfig("mqtt://memory", "gw1"), data=DataConfig(unit="R80711"),
                        state_dir=tmp_path, inference=True)
    broker = MemoryBroker()
    topics = Topics("f", "t")
    seen: queue.Queue[MessageReceived] = queue.Queue()
    watcher = MemoryTransport(broker, "watcher")
    watcher.start(lambda e: seen.put(e) if isinstance(e, MessageReceived) else None)
    for topic in (topics.updates_filter(), topics.telemetry_filter(), topics.status_filter()):
        watcher.subscribe(topic)

    aggregator = MemoryTransport(broker, "aggregator")
    aggregator.start(lambda e: None)
    weights = init_params(spec, np.random.default_rng(0))
    model = GlobalModel(0, 0, b"", spec, encode_tensors(weights))
    train = default_train_config(dataset)
    for kind, topic, body in ((Kind.MODEL, topics.model(), model),
                              (Kind.ROUND, topics.round(),
                               RoundAnnouncement(round=1, model_version=0, deadline=1e12, train=train))):
        env = codec.make_envelope(kind, "f", "t", 0, "aggregator", body, 0.0)
        aggregator.publish(topic, codec.encode(env), retain=True)

    service = EdgeService(config, MemoryTransport(broker, "gw1"), data, EdgeSecurity(),
                          server=ModelServer(tmp_path / "models"))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    got: dict[str, object] = {}
    while not {"update", "telemetry", "online"} <= set(got):
        msg = seen.get(timeout=60)
        env = codec.decode(msg.payload)
        if env.kind == "update":
            got["update"] = codec.decode_body(env, ModelUpdate)
        elif env.kind == "telemetry":
            got["telemetry"] = codec.decode_body(env, Telemetry)
        elif env.kind == "status":
            got[codec.decode_body(env, Status).state] = True
    service.stop()
    thread.join(timeout=10)

    update = got["update"]
    assert isinstance(update, ModelUpdate)
    assert update.round == 1 and update.base_version == 0 and update.num_samples == unit.num_train
    assert "eval_rmse" in update.stats and update.stats["eval_rmse"] > 0
    tele = got["telemetry"]
    assert isinstance(tele, Telemetry) and tele.model_version == 0
    assert tele.values["samples"] == min(256, unit.num_test) and tele.values["score_mean"] > 0
    (exported,) = (tmp_path / "models").glob("v0-*.tflite")  # version 0 of this lineage
    assert exported.stat().st_size > 1000
    # clean goodbye: retained offline status
    status = codec.decode_body(codec.decode(broker.retained[topics.status("gw1")][0]), Status)
    assert status.state == "offline"


def test_a_resumed_session_trains_once_on_the_newest_announcement(tmp_path: Path) -> None:
    """After a partition the broker resends, on the resumed session, an announcement from
    before it, and the newer ones follow: the gateway acts on the newest only."""
    dataset = load_dataset("synthetic", gateways=1, max_rows_per_unit=200)
    name, unit = next(iter(dataset.units.items()))
    spec, train = default_spec(dataset), default_train_config(dataset)
    data = DatasetSource(unit.x_train, unit.y_train, unit.x_test, unit.y_test,
                         float(dataset.scaler.target_std), dataset.task)
    config = EdgeConfig(file="edge.toml", device="gw1", fleet="f", task="t",
                        broker=BrokerConfig("mqtt://memory", "gw1"), data=DataConfig(unit=name),
                        state_dir=tmp_path)
    broker, topics = MemoryBroker(), Topics("f", "t")
    updates: queue.Queue[ModelUpdate] = queue.Queue()

    def on_update(event: object) -> None:
        if isinstance(event, MessageReceived) and event.payload:
            env = codec.decode(event.payload)
            if env.kind == "update":
                updates.put(codec.decode_body(env, ModelUpdate))

    watcher = MemoryTransport(broker, "watcher")
    watcher.start(on_update)
    watcher.subscribe(topics.updates_filter())
    aggregator = MemoryTransport(broker, "aggregator")
    aggregator.start(lambda e: None)
    weights = encode_tensors(init_params(spec, np.random.default_rng(0)))
    chain = [b""]  # each model names its parent's hash

    def announce(version: int, round_: int) -> None:
        model = GlobalModel(version, round_ - 1, chain[-1], spec, weights)
        chain.append(codec.body_hash(model))
        for kind, topic, body in ((Kind.MODEL, topics.model(), model),
                                  (Kind.ROUND, topics.round(),
                                   RoundAnnouncement(round=round_, model_version=version, deadline=1e12,
                                                     train=train))):
            env = codec.make_envelope(kind, "f", "t", round_, "aggregator", body, 0.0)
            aggregator.publish(topic, codec.encode(env), qos=1, retain=True)

    announce(0, 1)
    gateway = MemoryTransport(broker, "gw1")
    service = EdgeService(config, gateway, data, EdgeSecurity())
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        assert updates.get(timeout=60).round == 1
        gateway.drop_connection()
        announce(1, 2)  # waits in the gateway's session
        gateway.reconnect()  # round 2 arrives at once...
        threading.Event().wait(0.3)
        announce(2, 3)  # ...and the newer one a moment later
        assert updates.get(timeout=60).round == 3
        with pytest.raises(queue.Empty):
            updates.get(timeout=2.0)  # nothing for round 2
    finally:
        service.stop()
        thread.join(timeout=10)
