"""Chunked transfer: a signed 50 MB model through a Mosquitto limited to 256 KB packets.

The sender (this process) cuts the signed model with ``fedcore.protocol.chunks`` and
publishes the manifest and the retained chunks with the paho transport; the receiver is the
gateway's download code as a process (``tests/broker/chunk_receiver.py``), spooling to a
temporary folder. Reported: the chunk count and size, the sender's split-and-sign time, the
wall time from the first publish to the verified, decoded model, and the receiver's traced
memory peak while chunks came in and once the message was read back whole.

Usage: PYTHONPATH=$PWD python bench/bench_chunks.py [--limit 262144] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fedcore.protocol import chunks, codec, signing
from fedcore.protocol.messages import ChunkManifest, Kind
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected
from fedcore.transport.paho import PahoTransport
from fedgate.broker import start_broker
from tests.broker.test_chunked_transfer import AGGREGATOR, big_model
from tests.conftest import EventLog


def one_run(url: str, payload: bytes, limit_packet: int, tmp: Path) -> dict[str, float]:
    task = f"bench-{uuid.uuid4().hex[:8]}"
    topics = Topics("plant", task)
    log = EventLog()
    sender = PahoTransport(url, f"sender-{task}", rng=random.Random(0))
    sender.start(log)
    log.wait_for(Connected)
    out = tmp / f"{task}.json"
    receiver = subprocess.Popen(
        [sys.executable, "-m", "tests.broker.chunk_receiver", url, f"receiver-{task}", "plant", task,
         str(tmp / task), AGGREGATOR.verify_key.hex(), str(out)],
        stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # connected and subscribed

    def seal(manifest: ChunkManifest) -> bytes:
        env = codec.make_envelope(Kind.MANIFEST, "plant", task, 7, "aggregator", manifest, time.time())
        return codec.encode(signing.sign(env, AGGREGATOR))

    start = time.perf_counter()
    limit = sender.payload_limit(topics.model_chunk(b"\0" * 32))
    pubs = chunks.publications(payload, "model", topics.model(), limit, topics.model_chunk, seal, retain=True)
    split_s = time.perf_counter() - start
    for pub in pubs:
        sender.publish(pub.topic, pub.payload, qos=1, retain=True)
    receiver.wait(timeout=600)
    total_s = time.perf_counter() - start
    sender.stop()
    result = json.loads(out.read_text())
    return {"chunks": len(pubs) - 1, "chunk_bytes": limit, "split_s": split_s, "total_s": total_s,
            "intake_peak": result["intake_peak"], "whole_peak": result["whole_peak"],
            "ok": float(result["size"] == len(payload))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=256 * 1024, help="broker max_packet_size")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    payload, _ = big_model()
    tmp = Path(tempfile.mkdtemp(prefix="bench-chunks-"))
    broker = start_broker(prefer="mosquitto", data_dir=tmp / "broker", fallback=False,
                          extra_config=f"max_packet_size {args.limit}")
    try:
        print(f"model message: {len(payload)} bytes; broker max_packet_size {args.limit}")
        for i in range(args.runs):
            r = one_run(broker.url, payload, args.limit, tmp)
            print(f"run {i + 1}: {r['chunks']:.0f} chunks of <= {r['chunk_bytes']:.0f} B, split+sign "
                  f"{r['split_s']:.2f} s, first publish to verified model {r['total_s']:.2f} s "
                  f"({len(payload) / r['total_s'] / 1e6:.1f} MB/s), receiver traced peak "
                  f"{r['intake_peak'] / 2**20:.1f} MiB during intake, {r['whole_peak'] / 2**20:.1f} MiB "
                  f"with the message read back, intact: {bool(r['ok'])}")
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
