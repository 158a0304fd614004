"""A real EdgeService on the in-memory broker under its own [privacy] policy: a round that
announces no noise is refused with the reason in the status, a later complying round is
trained, sent and charged to the ledger in state_dir, and after a restart that charge
counts against the budget."""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
from pathlib import Path

import numpy as np

from edge.config import DataConfig, EdgeConfig
from edge.data import DatasetSource
from edge.privacy import PrivacyPolicy
from edge.runtime import EdgeService
from edge.security import EdgeSecurity
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedcore.learning.models import init_params
from fedcore.privacy.accountant import epsilon_of
from fedcore.protocol import codec
from fedcore.protocol.messages import (
    GlobalModel,
    Kind,
    ModelUpdate,
    PipelineConfig,
    RoundAnnouncement,
    Status,
)
from fedcore.protocol.tensors import encode_tensors
from fedcore.protocol.topics import Topics
from fedcore.service_config import BrokerConfig
from fedcore.transport.base import MessageReceived
from fedcore.transport.memory import MemoryBroker, MemoryTransport
from tests.aggregator.test_model_files import Aggregator


def test_a_round_without_noise_is_refused_a_noised_one_is_charged_and_the_charge_outlives_a_restart(
        tmp_path: Path) -> None:
    dataset = load_dataset("wind", max_rows_per_unit=600)
    unit = dataset.units["R80711"]
    data = DatasetSource(unit.x_train, unit.y_train, unit.x_test, unit.y_test,
                         float(dataset.scaler.target_std), dataset.task)
    config = EdgeConfig(file="edge.toml", device="gw1", fleet="f", task="t",
                        broker=BrokerConfig("mqtt://memory", "gw1"), data=DataConfig(unit="R80711"),
                        state_dir=tmp_path,
                        privacy=PrivacyPolicy(require="update", min_noise_multiplier=0.5))
    broker, topics = MemoryBroker(), Topics("f", "t")
    seen: queue.Queue[MessageReceived] = queue.Queue()
    watcher = MemoryTransport(broker, "watcher")
    watcher.start(lambda e: seen.put(e) if isinstance(e, MessageReceived) else None)
    watcher.subscribe(topics.updates_filter())
    watcher.subscribe(topics.status_filter())
    aggregator = MemoryTransport(broker, "aggregator")
    aggregator.start(lambda e: None)

    def publish(kind: Kind, topic: str, body: object) -> None:
        env = codec.make_envelope(kind, "f", "t", 0, "aggregator", body, 0.0)
        aggregator.publish(topic, codec.encode(env), retain=True)

    def announce(round_: int, noise: float) -> None:
        publish(Kind.ROUND, topics.round(), RoundAnnouncement(
            round=round_, model_version=0, deadline=1e12, train=default_train_config(dataset),
            pipeline=PipelineConfig(clip_norm=1.0, noise_multiplier=noise)))

    def next_of(kind: str, accept: object = None) -> object:
        while True:
            env = codec.decode(seen.get(timeout=60).payload)
            if env.kind == "update":
                body: object = codec.decode_body(env, ModelUpdate)
            elif env.kind == "status":
                body = codec.decode_body(env, Status)
            else:
                continue
            if kind == "update" or env.kind == "update":
                return body  # an update is always what the caller is checking for
            if isinstance(body, Status) and (accept is None or body.activity == accept):
                return body

    weights = init_params(default_spec(dataset), np.random.default_rng(0))
    publish(Kind.MODEL, topics.model(), GlobalModel(0, 0, b"", default_spec(dataset),
                                                    encode_tensors(weights)))
    announce(1, noise=0.0)  # what a compromised aggregator would announce
    service = EdgeService(config, MemoryTransport(broker, "gw1"), data, EdgeSecurity())
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        refused = next_of("status", "refusing")
        assert isinstance(refused, Status), "an update was sent under noise 0"
        assert refused.activity_detail.startswith("privacy_policy:")
        assert "pipeline.noise_multiplier=0" in refused.activity_detail
        assert not (tmp_path / "privacy-ledger.json").exists()
        # the aggregator reads that status as "online, not ready": rounds do not wait for it
        status_msg = MessageReceived(topics.status("gw1"), broker.retained[topics.status("gw1")][0], True)
        (tmp_path / "aggregator").mkdir()
        aggregator_service = Aggregator(tmp_path / "aggregator")
        aggregator_service.start()
        aggregator_service.service._on_status("gw1", status_msg, aggregator_service.now)
        assert "gw1" in aggregator_service.machine.unready

        announce(2, noise=1.0)
        update = next_of("update")
        assert isinstance(update, ModelUpdate) and update.round == 2
    finally:
        service.stop()
        thread.join(timeout=10)
    saved = json.loads((tmp_path / "privacy-ledger.json").read_text())
    assert saved["events"] == [[1.0, 1.0, 1]]

    # restarted with a budget that one more update at z = 1 would break: the saved charge counts
    budget = (epsilon_of([(1.0, 1.0, 1)], 1e-5) + epsilon_of([(1.0, 1.0, 2)], 1e-5)) / 2
    config = dataclasses.replace(config, privacy=PrivacyPolicy(require="update", max_epsilon=budget))
    announce(3, noise=1.0)
    service = EdgeService(config, MemoryTransport(broker, "gw1"), data, EdgeSecurity())
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        spent = next_of("status", "refusing")
        assert isinstance(spent, Status), "an update was sent over the budget"
        assert spent.activity_detail.startswith("privacy_budget_spent:")
    finally:
        service.stop()
        thread.join(timeout=10)
    assert json.loads((tmp_path / "privacy-ledger.json").read_text())["events"] == [[1.0, 1.0, 1]]
