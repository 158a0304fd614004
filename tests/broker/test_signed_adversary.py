"""A provisioned device turned hostile, against the running aggregator over mTLS Mosquitto.

"mallory" holds a valid device bundle (certificate, signing key in the fleet keyring) and
sends hostile but validly signed messages of every kind a device may send (see
``tests/broker/adversary.py``): statistics answers during the lineage's statistics round,
before the honest gateways start, then everything else while two honest gateways run,
paused so that the round under attack stays open. The aggregator must keep running and
committing rounds, its memory must stay bounded, every hostile message must be accounted
for as a rejection with its reason in the hash-chained audit log and in its counters, and
what it publishes or keeps per round must stay small and finite, with mallory never among
the participants.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.audit import verify_chain
from aggregator.security import MAX_REJECTION_LINES
from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedcore.protocol import codec, signing
from fedcore.protocol.messages import RoundAnnouncement, RoundSummary, TaskState
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, MessageReceived, TlsSettings
from fedcore.transport.paho import PahoTransport
from fedgate import provision
from fedgate.demo import start_secure_broker
from fedgate.demo_configs import DemoOptions, device_id, write_configs
from tests.broker.adversary import NAME, Hostile, Mallory, every

pytestmark = [pytest.mark.broker, pytest.mark.slow]

# Why 112 MB, fourteen of the largest message (8 MB, the codec's limit): the aggregator
# holds at most two waiting in its inbox (aggregator/inbox.py) and one more the network
# thread holds while it waits to put it, about three copies of the one being refused
# (payload, body, tensor bytes), the MQTT client's read buffer, and the allocator keeps
# freed blocks of each thread's arena for reuse, which RSS still counts (peaks measured
# here: 78-82 MB). The attack sends ~310 MB (forty 7.5 MB updates in bursts, an 8 MB one,
# a zlib bomb that would expand to 64 MB), so keeping any sizeable part of it crosses the
# bound; the peak does not grow with the number of large updates (24 or 40: the same).
RSS_GROWTH_BOUND_KB = 112 * 1024
SUMMARY_BOUND = 16 * 1024  # bytes of one published round summary (two gateways)
CHECKPOINT_BOUND = 2 * 1024 * 1024  # the model is a few kB; the replay guard a few thousand ids


def client(url: str, bundle: Path, client_id: str, max_payload: int = 8 * 1024 * 1024) -> PahoTransport:
    tls = TlsSettings(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")
    return PahoTransport(url, client_id, clean_start=True, tls=tls, rng=random.Random(0),
                         max_payload=max_payload)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(finite(v) for v in value)
    return True


def rejections(audit: Path) -> Counter[str]:
    """mallory's rejections in the audit log, by reason: one line each, and past the
    per-round line cap (aggregator/security.py) the counts of a rejections_suppressed line."""
    reasons: Counter[str] = Counter()
    for line in audit.read_text().splitlines():
        e = json.loads(line)
        if NAME not in str(e.get("who", "")):
            continue
        if e["kind"] == "rejection":
            reasons[e["reason"]] += 1
        elif e["kind"] == "rejections_suppressed":
            reasons.update(e["reasons"])
    return reasons


def test_hostile_signed_device_is_refused_with_counted_reasons(tmp_path: Path) -> None:
    dataset = load_dataset("synthetic", gateways=2, max_rows_per_unit=200)
    devices = [device_id(u) for u in dataset.units]
    fleet = tmp_path / "fleet"
    spec = default_spec(dataset)
    broker = start_secure_broker(fleet, "plant", [*devices, NAME], "t")
    url = broker.url.replace("mqtt://", "mqtts://")
    options = DemoOptions(dataset="synthetic", gateways=2, rounds=100_000, fleet="plant", task="t",
                          max_rows_per_unit=200)
    files = write_configs(tmp_path, url, options, dataset, spec, default_train_config(dataset), fleet)
    # The lineage opens with a statistics round (fleet scaler), so DataStats meet their
    # checks; a round needs both honest gateways and waits for them (no straggler window),
    # so it stays open while they are paused, whatever the machine's load.
    text = files.aggregator.read_text()
    for old, new in (('scaling = "none"', 'scaling = "federated"'),
                     ("min_participants = 1\n", "min_participants = 2\nstraggler_factor = 0\n")):
        assert old in text, old
        text = text.replace(old, new)
    files.aggregator.write_text(text)
    topics = Topics("plant", "t")
    provision.provision_operator(fleet, "watch")  # rewrites the ACL: the broker reloads it on restart
    broker.stop()
    broker.start()

    summaries: list[tuple[int, RoundSummary]] = []
    announced: list[RoundAnnouncement] = []
    states: list[TaskState] = []
    lock = threading.Lock()
    watch = client(url, fleet / "operators" / "watch", "watch")

    def on_watch(event: object) -> None:
        if isinstance(event, Connected):
            watch.subscribe(topics.metrics())
            watch.subscribe(topics.round())
            watch.subscribe(topics.state())
        elif isinstance(event, MessageReceived) and event.payload:
            env = codec.decode(event.payload)
            with lock:
                if event.topic == topics.metrics():
                    summaries.append((len(event.payload), codec.decode_body(env, RoundSummary)))
                elif event.topic == topics.state():
                    states.append(codec.decode_body(env, TaskState))
                else:
                    announced.append(codec.decode_body(env, RoundAnnouncement))

    def current() -> tuple[int, int, str]:
        with lock:
            ann = announced[-1]
        return ann.round, ann.model_version, ann.lineage

    def committed() -> int:
        with lock:
            return max((s.model_version for _, s in summaries), default=0)

    def wait_for(check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    watch.start(on_watch)
    procs: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "fedgate", "-v", *args], stdout=log, stderr=log)

    # mallory's own client sends up to what the broker passes, past the aggregator's limit
    mallory_link = client(url, fleet / "devices" / NAME, NAME, max_payload=8 * 1024 * 1024 + 32 * 1024)
    try:
        procs.append(start(["aggregator", "run", "-c", str(files.aggregator)], "aggregator"))
        aggregator = procs[0]
        key = signing.SigningKey.from_pem((fleet / "devices" / NAME / "signing.key").read_bytes())
        mallory = Mallory(topics, key, spec, victim=devices[0])
        mallory_link.start(lambda e: None)
        wait_for(lambda: mallory_link.connected, 30, "mallory could not connect")
        sent: list[Hostile] = []

        def send(hostile: Hostile) -> None:
            result = mallory_link.publish(hostile.topic, hostile.payload, qos=1,
                                          wait=None if hostile.burst else 30)
            assert not result.denied, f"the broker refused {hostile.what} on {hostile.topic}"
            sent.append(hostile)

        # The statistics round waits for the honest gateways, not yet started: mallory's
        # answers are checked for their content, and none of them closes the round.
        audit = tmp_path / "aggregator-state" / "audit.jsonl"
        wait_for(lambda: bool(announced) and announced[-1].purpose == "statistics", 60,
                 "no statistics round announced")
        for hostile in mallory.statistics(announced[-1].round, announced[-1].lineage, in_round=True):
            send(hostile)
        wait_for(lambda: audit.exists() and rejections(audit).total() >= len(sent), 30,
                 "hostile statistics were not all rejected")
        assert aggregator.poll() is None
        procs += [start(["edge", "run", "-c", str(p)], u) for u, p in files.edges.items()]
        wait_for(lambda: committed() >= 2, 120, "no rounds committed by the honest fleet")
        wait_for(lambda: bool(announced), 30, "no round announcement seen")
        rss_before = rss_kb(aggregator.pid)
        version_before = committed()

        # Hold the round open: with the honest gateways paused it waits for them (up to its
        # 60 s timeout, then longer: no quorum), so every hostile update meets the checks of
        # the round it names.
        # (Rounds here take a fraction of a second; without the pause many would be "late".)
        for p in procs[1:]:
            p.send_signal(signal.SIGSTOP)
        held = current()
        time.sleep(1.0)
        while current() != held:  # an update in flight when paused may still close one round
            held = current()
            time.sleep(1.0)
        rss_peak = rss_before
        for hostile in every(mallory, current):
            send(hostile)
            rss_peak = max(rss_peak, rss_kb(aggregator.pid))
            assert aggregator.poll() is None, f"aggregator died after {hostile.what}"
        counted = [h for h in sent if h.counted]
        assert current() == held, "the round under attack closed while the honest gateways were paused"

        for p in procs[1:]:
            p.send_signal(signal.SIGCONT)
        # the honest fleet goes on: two more rounds after the attack (the first of them
        # writes the counts of the rejections past the round's audit line cap)
        wait_for(lambda: committed() >= version_before + 2, 90, "rounds stopped committing")
        wait_for(lambda: rejections(audit).total() >= len(counted), 60,
                 "not every hostile message was rejected with a reason")
        rss_after = rss_kb(aggregator.pid)
        assert aggregator.poll() is None

        # every hostile message is one counted rejection with a reason it may carry
        reasons = rejections(audit)
        assert reasons.total() == len(counted), (reasons.total(), len(counted), reasons)
        # the flood cost the log a bounded number of lines: at most the cap per sender name
        # (device, update topic, chunk topic, status topic) and round, plus one count line
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        mine = [e for e in lines if NAME in str(e.get("who", ""))]
        rounds_touched = len({e["before_round"] for e in mine if e["kind"] == "rejections_suppressed"}) + 2
        assert len(mine) <= rounds_touched * 4 * (MAX_REJECTION_LINES + 1), len(mine)
        allowed = set().union(*(h.reasons for h in counted))
        assert set(reasons) <= allowed, set(reasons) - allowed
        # each message was refused for its own reason (the replay: replayed, or out of the
        # guard's window); the multiset of reasons is exactly the attack's
        expected = Counter(min(h.reasons) if len(h.reasons) == 1 else "replay" for h in counted)
        replays = reasons["replayed"] + reasons["stale_round"]
        observed = Counter({r: n for r, n in reasons.items() if r not in ("replayed", "stale_round")})
        assert observed + Counter({"replay": replays}) == expected, (reasons, expected)
        assert verify_chain(audit).ok

        # the aggregator's counters (its retained task state) count them too
        def counted_in_state() -> bool:
            with lock:
                rejected = states[-1].rejected if states else {}
            return all(rejected.get(r, 0) >= n for r, n in reasons.items())

        wait_for(counted_in_state, 30, f"task state counters {states[-1:]} miss {reasons}")

        # bounded memory, small and finite outputs, mallory never fused
        print(f"aggregator RSS kB: before {rss_before}, peak {rss_peak}, after {rss_after}; "
              f"{len(counted)} hostile messages, {sum(len(h.payload) for h in sent)} bytes")
        assert rss_peak - rss_before < RSS_GROWTH_BOUND_KB, (rss_before, rss_peak)
        assert rss_after - rss_before < RSS_GROWTH_BOUND_KB, (rss_before, rss_after)
        with lock:
            published = list(summaries)
        for size, summary in published:
            assert size < SUMMARY_BOUND, size
            assert NAME not in summary.participants and NAME not in summary.per_gateway
            assert finite(summary.metrics) and finite(summary.per_gateway) and finite(summary.epsilon)
        checkpoint = tmp_path / "aggregator-state" / "checkpoint.npz"
        assert checkpoint.stat().st_size < CHECKPOINT_BOUND
        with np.load(checkpoint) as arrays:
            meta = bytes(arrays["meta"]).decode()
            assert all(np.isfinite(arrays[k]).all() for k in arrays.files if k != "meta")
        assert "NaN" not in meta and "Infinity" not in meta
        accepted = [json.loads(line) for line in audit.read_text().splitlines()]
        refusals = ("rejection", "rejections_suppressed")
        assert not [e for e in accepted if e["kind"] not in refusals and NAME in json.dumps(e)]
    finally:
        mallory_link.stop()
        for p in procs:
            p.send_signal(signal.SIGCONT)  # a paused gateway handles SIGTERM once resumed
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        watch.stop()
        broker.stop()
