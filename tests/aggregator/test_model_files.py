"""The aggregator's model files: written once the model is out, none forgotten after a
failed write, rewritten at start-up when a crash lost one (a runtime with a fake transport)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator import checkpoint as checkpoints
from aggregator import rounds as sm
from aggregator.config import load_aggregator_config
from aggregator.runtime import AggregatorService
from aggregator.security import AggregatorSecurity
from edge.participant import encode_raw
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedcore.protocol.messages import ModelUpdate, PipelineConfig
from fedgate.demo_configs import DemoOptions, write_configs


class Outbox:
    """The transport calls the runtime makes, kept in order."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def start(self, on_event: Any) -> None:
        pass

    def stop(self) -> None:
        pass

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        pass

    def payload_limit(self, topic: str, qos: int = 1) -> int:
        return 8 * 1024 * 1024

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wait: float | None = None) -> None:
        self.sent.append(topic)


class Aggregator:
    def __init__(self, tmp: Path) -> None:
        dataset = load_dataset("synthetic", gateways=1, max_rows_per_unit=100)
        options = DemoOptions(dataset="synthetic", gateways=1, rounds=0, fleet="f", task="t")
        files = write_configs(tmp, "mqtt://127.0.0.1:1", options, dataset, default_spec(dataset),
                              default_train_config(dataset))
        self.config = load_aggregator_config(files.aggregator)
        self.now = 1.75e9
        self.transport = Outbox()
        self.service = AggregatorService(self.config, self.transport,  # type: ignore[arg-type]
                                         AggregatorSecurity.from_paths(self.config.file, {}, None),
                                         clock=lambda: self.now)
        self.machine = self.service.machine
        self._ids = 0

    def start(self) -> None:
        self.service._apply(self.machine.handle(sm.Started(self.now, b"\0\0\0\0")))
        self.service._apply(self.machine.handle(sm.DeviceOnline(self.now, "gw1", True, 0)))

    def round(self) -> None:
        m = self.machine
        delta, _ = encode_raw([np.full(w.shape, 0.01, np.float32) for w in m.weights], PipelineConfig())
        update = ModelUpdate(round=m.round, base_version=m.version, num_samples=100, delta=delta,
                             train_loss=0.1, stats={})
        self.now += 1
        self._ids += 1
        self.service._apply(m.handle(sm.UpdateReceived(self.now, "gw1", f"m{self._ids}", update, 100)))

    def kept(self) -> list[int]:
        return checkpoints.kept_versions(self.config.state_dir)


def test_a_model_file_goes_out_after_the_model_and_the_announcement(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    agg = Aggregator(tmp_path)
    agg.start()
    order: list[str] = []
    real = checkpoints.save_model
    monkeypatch.setattr(checkpoints, "save_model", lambda d, v, w: (order.append(f"file v{v}"), real(d, v, w))[1])
    agg.transport.sent.clear()
    agg.round()
    topics = [t.rsplit("/", 1)[-1] for t in agg.transport.sent]
    assert topics.index("model") < topics.index("round")
    assert order == ["file v1"] and agg.kept() == [0, 1]


def test_no_model_file_is_forgotten_after_a_failed_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agg = Aggregator(tmp_path)
    agg.start()
    real = checkpoints.save_model
    refuse = {2}

    def full_once(directory: Path, version: int, weights: list[np.ndarray]) -> Path:
        if version in refuse:
            refuse.discard(version)
            raise OSError(28, "No space left on device")
        return real(directory, version, weights)

    monkeypatch.setattr(checkpoints, "save_model", full_once)
    agg.round()
    agg.round()  # version 2's file is refused
    assert agg.kept() == [0, 1]
    agg.round()  # the checkpoint of version 3 is written: version 2 is still due
    agg.now += 10
    agg.service._retry_held(agg.now)
    agg.round()
    assert agg.kept() == [0, 1, 2, 3, 4]
    assert not agg.service.writer.failed_at


def test_a_model_file_a_crash_lost_is_written_at_start(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path)
    agg.start()
    agg.round()
    agg.round()
    checkpoints.model_path(agg.config.state_dir, 2).unlink()  # died before writing it
    again = Aggregator(tmp_path)
    assert again.machine.version == 2
    again.start()
    assert 2 in again.kept()
    np.testing.assert_array_equal(checkpoints.load_model(again.config.state_dir, 2)[0],
                                  again.machine.weights[0])


def test_a_summary_a_crash_kept_from_going_out_is_published_at_start(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path)
    agg.start()
    agg.round()
    assert "fg/f/t/metrics" in agg.transport.sent
    again = Aggregator(tmp_path)  # a clean restart: the summary went out, not again
    again.start()
    assert "fg/f/t/metrics" not in again.transport.sent
    (agg.config.state_dir / checkpoints.SUMMARY_SENT).unlink()  # died between checkpoint and publish
    third = Aggregator(tmp_path)
    third.start()
    assert third.transport.sent.count("fg/f/t/metrics") == 1
