"""Chunked transfer over a real Mosquitto whose packets are limited to 256 KB.

A signed 50 MB model (a dense 3000-4200-1 MLP) is cut by ``fedcore.protocol.chunks`` into
retained chunks, as the aggregator publishes it. A gateway's model download
(``tests/broker/chunk_receiver.py``, the gateway's own code for these topics) runs as a
process; it is killed with SIGKILL half way and started again on the same spool, while the
rest is published. It must finish from what it kept, verify the aggregator's signature on
the assembled model, decode it to the same weights, and hold far less than the model in
memory while the chunks come in.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedcore.protocol import chunks, codec, signing
from fedcore.protocol.messages import ChunkManifest, GlobalModel, Kind, ModelSpec
from fedcore.protocol.tensors import encode_tensors
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, MessageReceived
from fedcore.transport.paho import PahoTransport
from fedgate.broker import RunningBroker
from tests.broker.test_federation import Run
from tests.conftest import EventLog

pytestmark = [pytest.mark.broker, pytest.mark.slow]
LIMIT = 256 * 1024
AGGREGATOR = signing.SigningKey.from_seed(b"\x31" * 32)


def big_model() -> tuple[bytes, str]:
    """A signed model message of ~50 MB and the SHA-256 of its weights."""
    rng = np.random.default_rng(0)
    spec = ModelSpec("mlp", (3000, 4200, 1))
    weights = [rng.standard_normal((3000, 4200), dtype=np.float32), np.zeros(4200, np.float32),
               rng.standard_normal((4200, 1), dtype=np.float32), np.zeros(1, np.float32)]
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
    model = GlobalModel(7, 7, b"\0" * 32, spec, encode_tensors(weights))
    env = codec.make_envelope(Kind.MODEL, "plant", "big", 7, "aggregator", model, 1.0)
    return codec.encode(signing.sign(env, AGGREGATOR)), digest


class Receiver:
    """The download process; its stdout lines are collected as they come."""

    def __init__(self, tmp: Path, url: str, task: str, *extra: str) -> None:
        self.out = tmp / "result.json"
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.broker.chunk_receiver", url, f"receiver-{task}", "plant", task,
             str(tmp / "spool"), AGGREGATOR.verify_key.hex(), str(self.out), *extra],
            stdout=subprocess.PIPE, stderr=open(tmp / "receiver.log", "ab"), text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.strip())
                self._cond.notify_all()

    def wait_held(self, n: int, timeout: float = 120.0) -> None:
        def enough() -> bool:
            return any(line.startswith("held ") and int(line[5:].split("/")[0]) >= n for line in self.lines)

        with self._cond:
            assert self._cond.wait_for(enough, timeout), self.lines[-5:]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("session", ["kept", "lost"])
def test_a_50mb_model_crosses_a_256kb_broker_across_a_receiver_kill(
    mosquitto_factory, tmp_path: Path, session: str
) -> None:
    broker: RunningBroker = mosquitto_factory(extra_config=f"max_packet_size {LIMIT}")
    task = f"big-{uuid.uuid4().hex[:8]}"
    topics = Topics("plant", task)
    payload, weights_sha = big_model()
    assert len(payload) > 50_000_000

    log = EventLog()
    sender = PahoTransport(broker.url, f"sender-{task}", rng=random.Random(0))
    sender.start(log)
    log.wait_for(Connected)
    limit = sender.payload_limit(topics.model_chunk(b"\0" * 32))
    assert limit < LIMIT

    def seal(manifest: object) -> bytes:
        env = codec.make_envelope(Kind.MANIFEST, "plant", task, 7, "aggregator", manifest, 1.0)  # type: ignore[arg-type]
        return codec.encode(signing.sign(env, AGGREGATOR))

    pubs = chunks.publications(payload, "model", topics.model(), limit, topics.model_chunk, seal, retain=True)
    total = len(pubs) - 1
    assert total == -(-len(payload) // limit) > 190 and all(len(p.payload) <= limit for p in pubs)

    receiver = Receiver(tmp_path, broker.url, task)
    half = total // 2
    for pub in pubs[:1 + half]:  # the manifest and the first half
        sender.publish(pub.topic, pub.payload, qos=1, retain=True)
    receiver.wait_held(half // 2)
    receiver.kill()  # mid-transfer: no clean disconnect, chunks in flight are lost
    for pub in pubs[1 + half:]:  # published while the receiver is down
        sender.publish(pub.topic, pub.payload, qos=1, retain=True)
    again = Receiver(tmp_path, broker.url, task, *(["--clean-start"] if session == "lost" else []))
    assert again.proc.wait(timeout=300) == 0, (tmp_path / "receiver.log").read_text()[-3000:]
    sender.stop()

    restored = [line for line in again.lines if line.startswith("restored ")]
    held_at_restart = int(restored[0].split()[1].split("/")[0])
    assert held_at_restart >= half // 2  # what the spool kept across SIGKILL
    result = json.loads(receiver.out.read_text())
    assert result["tensors_sha256"] == weights_sha and result["version"] == 7
    assert result["size"] == len(payload)
    assert result["stored"] == total - held_at_restart  # resumed: only the missing chunks written
    # While chunks came in, memory held a few chunks, never the model; the message itself
    # is read back once, for decoding.
    assert result["intake_peak"] < 8 * 1024 * 1024, result
    assert result["whole_peak"] < len(payload) + 8 * 1024 * 1024, (result, again.lines[:3], again.lines[-8:])
    assert list((tmp_path / "spool").iterdir()) == []


@pytest.mark.timeout(300)
def test_services_chunk_the_model_and_the_updates_through_a_64kb_broker(
    mosquitto_factory, tmp_path: Path
) -> None:
    """The aggregator and gateway agents as processes: a 145k-parameter model (580 KB) and
    each update cross a broker whose packets are limited to 64 KB, round after round; in the
    end the broker retains exactly the chunks of the last model."""
    broker: RunningBroker = mosquitto_factory(extra_config=f"max_packet_size {64 * 1024}")
    run = Run(tmp_path, broker.url, rounds=3, gateways=2, task=f"chunked-{uuid.uuid4().hex[:8]}")
    try:
        text = re.sub(r"layer_sizes = \[[^\]]*\]", "layer_sizes = [24, 512, 256, 4]",
                      run.files.aggregator.read_text())
        run.files.aggregator.write_text(text)
        run.start_all()
        assert [run.next_summary(timeout=120).round for _ in range(3)] == [1, 2, 3]
        model_log = (tmp_path / "aggregator.log").read_text()
        assert re.search(r"model of \d+ bytes published as \d+ chunks", model_log)
        assert re.search(r"sends its update of \d+ bytes as \d+ chunks", model_log)
        for unit in run.files.edges:
            edge_log = (tmp_path / f"{unit}.log").read_text()
            assert re.search(r"update of \d+ bytes sent as \d+ chunks", edge_log), edge_log[-2000:]
            assert "model of" in edge_log and "coming in" in edge_log
            assert "rejected" not in edge_log
        # What a newcomer gets: the signed manifest and exactly its chunks, nothing older.
        log = EventLog()
        newcomer = PahoTransport(broker.url, f"newcomer-{run.topics.task}", clean_start=True,
                                 rng=random.Random(2))
        newcomer.start(log)
        log.wait_for(Connected)
        for topic in (run.topics.model(), run.topics.model_chunks_filter()):
            newcomer.subscribe(topic)
        manifest_msg = log.wait_for(MessageReceived, lambda m: m.topic == run.topics.model())
        manifest = codec.decode_body(codec.decode(manifest_msg.payload), ChunkManifest)
        retained = {m.topic for m in log.messages(1 + len(manifest.chunks))
                    if m.topic != run.topics.model()}
        time.sleep(1.0)  # anything more would be a stale chunk
        retained |= {m.topic for m in log.messages(0) if m.topic != run.topics.model()}
        assert retained == {run.topics.model_chunk(h) for h in manifest.chunks}
        newcomer.stop()
    finally:
        run.close()
