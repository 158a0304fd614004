"""Hostile but validly signed messages of every kind a device may send the aggregator.

The adversary is a provisioned device ("mallory"): its own certificate, its own signing key
in the fleet keyring. Every message here is built with the real codec and signed with that
key, so it passes the broker's ACL and the aggregator's signature check; what must stop it
is validation. Each :class:`Hostile` names the rejection reason(s) that account for it. An
update's content is only checked in the round it names, so the test holds the round open
(the honest gateways paused) while these are sent: each then meets its own check.
"""

from __future__ import annotations

import hashlib
import math
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from aggregator.statistics import expected_columns
from fedcore.learning.models import param_shapes
from fedcore.protocol import codec, signing
from fedcore.protocol.chunks import split
from fedcore.protocol.messages import (
    CanaryReport,
    ChunkManifest,
    DataStats,
    EncodedDelta,
    Kind,
    ModelSpec,
    ModelUpdate,
    RoundAnnouncement,
    Status,
    Telemetry,
)
from fedcore.protocol.tensors import encode_tensor, encode_tensors
from fedcore.protocol.topics import Topics

NAME = "mallory"
FAR = 10**6  # a round far ahead: the replay guard refuses only rounds older than its window
NAN, INF = math.nan, math.inf
Current = Callable[[], tuple[int, int, str]]  # the (round, model version, lineage) last announced


@dataclass(frozen=True)
class Hostile:
    what: str
    topic: str
    payload: bytes
    reasons: frozenset[str]  # any one of these accounts for it
    counted: bool = True  # False: a part of a chunked message (its whole message is counted)
    burst: bool = False  # sent without waiting for the broker's ack: as fast as the link goes


class Mallory:
    """Builds mallory's signed messages for the round it believes is current."""

    def __init__(self, topics: Topics, key: signing.SigningKey, spec: ModelSpec, victim: str) -> None:
        self.topics = topics
        self.key = key
        self.spec = spec
        self.victim = victim  # an honest device's name mallory claims to be
        self.shapes = param_shapes(spec)

    def seal(self, kind: Kind, round_: int, body: msgspec.Struct, *, sender: str = NAME,
             task: str | None = None, message_id: str | None = None,
             raw_body: bytes | None = None, signed: bool = True) -> bytes:
        env = codec.make_envelope(kind, self.topics.fleet, task or self.topics.task, round_, sender,
                                  body, time.time(), message_id)
        if raw_body is not None:
            env = msgspec.structs.replace(env, body=raw_body)
        return codec.encode(signing.sign(env, self.key) if signed else env)

    def zeros(self) -> EncodedDelta:
        arrays = [np.zeros(s, np.float32) for s in self.shapes]
        return EncodedDelta((), self.shapes, encode_tensors(arrays))

    def update(self, round_: int, version: int, **changes: object) -> ModelUpdate:
        good = ModelUpdate(round=round_, base_version=version, num_samples=100, delta=self.zeros())
        return msgspec.structs.replace(good, **changes)

    # ---- the attack, in kinds ------------------------------------------------------------

    def updates(self, round_: int, version: int) -> Iterator[Hostile]:
        topic = self.topics.update(NAME)

        def h(what: str, body: ModelUpdate, *reasons: str, race: bool = True, **seal: object) -> Hostile:
            """``race=False``: a check that comes before the round's; the envelope names a
            round far ahead, so that no round check could be what refuses it."""
            env_round = body.round if race else body.round + FAR
            return Hostile(what, topic, self.seal(Kind.UPDATE, env_round, body, **seal), frozenset(reasons))  # type: ignore[arg-type]

        u = self.update
        yield h("NaN stat", u(round_, version, stats={"mae": NAN}), "bad_stats")
        yield h("infinite stat", u(round_, version, stats={"mae": INF}), "bad_stats")
        yield h("1000 stats", u(round_, version, stats={f"s{i}": 1.0 for i in range(1000)}), "bad_stats")
        yield h("NaN train_loss", u(round_, version, train_loss=NAN), "bad_stats")
        yield h("-inf train_loss", u(round_, version, train_loss=-INF), "bad_stats")
        samples_2_62 = h("num_samples 2**62", u(round_, version, num_samples=2**62), "bad_samples")
        yield samples_2_62
        yield h("negative num_samples", u(round_, version, num_samples=-7), "bad_samples")
        yield h("a round far ahead", u(round_ + 1000, version), "wrong_round")
        body = u(round_ + FAR + 1, version)
        yield Hostile("envelope and body rounds differ", topic,
                      self.seal(Kind.UPDATE, round_ + FAR, body), frozenset({"bad_round"}))
        yield h("a base version never published", u(round_, version + 7), "stale_base")
        bad_shape = EncodedDelta((), ((3, 3),), (encode_tensor(np.zeros((3, 3), np.float32)),))
        yield h("shapes not the model's", u(round_, version, delta=bad_shape), "bad_shape")
        yield h("a zlib bomb", u(round_, version, delta=self._bomb()), "too_large")
        int8 = EncodedDelta(("int8",), self.shapes, self.zeros().parts)
        yield h("int8 stage over float parts", u(round_, version, delta=int8), "bad_encoding")
        rot13 = EncodedDelta(("rot13",), self.shapes, self.zeros().parts)
        yield h("an unknown stage", u(round_, version, delta=rot13), "bad_encoding")
        nans = [np.full(s, np.nan, np.float32) for s in self.shapes]
        yield h("NaN delta", u(round_, version, delta=EncodedDelta((), self.shapes, encode_tensors(nans))),
                "not_finite")
        # Unknown trailing fields are ignored by design (newer peers append fields), so the
        # extra ones here ride on an otherwise refused update: they must not change that.
        fields = list(msgspec.structs.astuple(u(round_, version, num_samples=0)))
        extra = msgspec.msgpack.encode([*fields, "x" * 100_000, {"admin": True}, 2**63 - 1])
        yield h("extra fields", u(round_, version), "bad_samples", raw_body=extra)
        yield h("a body that is not msgpack", u(round_, version), "bad_body", race=False,
                raw_body=b"\xc1\xc1\xc1")
        yield h("a 100 kB message id", u(round_, version), "malformed", race=False,
                message_id="i" * 100_000)
        yield h("signed by mallory, claims another sender", u(round_, version), "sender_mismatch",
                race=False, sender=self.victim)
        yield h("unsigned", u(round_, version), "unsigned", race=False, signed=False)
        yield h("another task", u(round_, version), "wrong_task", race=False, task="other")
        yield Hostile("replay of the 2**62 update", topic, samples_2_62.payload,
                      frozenset({"replayed", "stale_round"}))
        over = self.seal(Kind.UPDATE, round_, u(round_, version), raw_body=b"\0" * (codec.DEFAULT_MAX_MESSAGE_BYTES + 1024))
        yield Hostile("over the message limit", topic, over, frozenset({"too_large"}))
        for kind, other in ((Kind.ROUND, RoundAnnouncement(round_, version, 0.0)),
                            (Kind.TELEMETRY, Telemetry(model_version=version))):
            yield Hostile(f"a {kind.value} on the update topic", topic,
                          self.seal(kind, round_, other), frozenset({"bad_kind"}))

    def _bomb(self) -> EncodedDelta:
        """zlib that expands to 64 MB of zeros: the model's delta is a few kB."""
        z = zlib.compressobj(9)
        block = b"\0" * (1 << 20)
        blob = b"".join(z.compress(block) for _ in range(64)) + z.flush()
        return EncodedDelta(("zlib",), self.shapes, (encode_tensor(np.frombuffer(blob, np.uint8)),))

    def near_limit(self, current: Current, count: int) -> Iterator[Hostile]:
        """Updates of about 7.5 MB (under the 8 MB limit) whose one huge tensor is no layer."""
        topic = self.topics.update(NAME)
        data = np.zeros(7_500_000 // 4, np.float32)
        delta = EncodedDelta((), ((data.size,),), (encode_tensor(data),))
        for i in range(count):
            round_, version, _ = current()
            body = self.update(round_, version, delta=delta)
            yield Hostile(f"7.5 MB update {i}", topic, self.seal(Kind.UPDATE, round_, body),
                          frozenset({"bad_shape"}), burst=i < count - 1)

    def flood(self, current: Current, count: int) -> Iterator[Hostile]:
        topic = self.topics.update(NAME)
        for i in range(count):
            round_, version, _ = current()
            body = self.update(round_, version, num_samples=0, train_loss=float(i))
            yield Hostile(f"flood {i}", topic, self.seal(Kind.UPDATE, round_, body),
                          frozenset({"bad_samples"}))

    def statistics(self, round_: int, lineage: str, in_round: bool) -> Iterator[Hostile]:
        """DataStats out of bounds: refused for their content during the lineage's
        statistics round (``in_round``), and as late at any other time."""
        topic = self.topics.update(NAME)
        cols = expected_columns(self.spec)
        k = len(cols)
        ok = DataStats(lineage, cols, 10, (0.0,) * k, (1.0,) * k)
        for what, body, reason in (
            ("NaN sums", msgspec.structs.replace(ok, sums=(NAN,) * k), "bad_stats"),
            ("negative count", msgspec.structs.replace(ok, count=-5), "bad_stats"),
            ("count 2**62", msgspec.structs.replace(ok, count=2**62), "bad_stats"),
            ("negative centred squares", msgspec.structs.replace(ok, m2=(-1.0,) * k), "bad_stats"),
            ("wrong columns", msgspec.structs.replace(ok, columns=("x",) * (k + 3)), "bad_columns"),
            ("wrong lineage", msgspec.structs.replace(ok, lineage="f" * 64), "wrong_lineage"),
        ):
            yield Hostile(f"statistics: {what}", topic, self.seal(Kind.STATS, round_, body),
                          frozenset({reason if in_round else "late"}))

    def canary_reports(self, round_: int, version: int) -> Iterator[Hostile]:
        topic = self.topics.update(NAME)
        refused = frozenset({"no_canary"})  # none is running: a report is refused before its content
        garbage = CanaryReport(0, version, version, {"mae": NAN, "x" * 60: -INF}, {"mae": -1.0}, -3)
        never = CanaryReport(10**9, 10**9, 10**9 + 1, {"mae": 0.1}, {"mae": 0.2}, 10)
        yield Hostile("canary: garbage metrics", topic, self.seal(Kind.CANARY, round_, garbage), refused)
        yield Hostile("canary: versions never deployed", topic, self.seal(Kind.CANARY, round_, never), refused)

    def statuses(self) -> Iterator[Hostile]:
        topic = self.topics.status(NAME)
        bad = frozenset({"bad_status"})
        for what, status in (
            ("state banana", Status(state="banana")),
            ("rows_new 2**62", Status(state="online", rows_new=2**62)),
            ("rows_new -1", Status(state="online", rows_new=-1)),
            ("a 1 MB software string", Status(state="online", software="s" * 1_000_000)),
            ("NaN evaluation", Status(state="online", last_eval={"mae": NAN})),
        ):
            yield Hostile(f"status: {what}", topic, self.seal(Kind.STATUS, 0, status), bad)
        yield Hostile("status: claims another sender", topic,
                      self.seal(Kind.STATUS, 0, Status(state="offline"), sender=self.victim),
                      frozenset({"sender_mismatch"}))

    def manifests(self, round_: int, version: int) -> Iterator[Hostile]:
        topic, chunk_topic = self.topics.update(NAME), self.topics.update_chunk(NAME)
        h32 = hashlib.sha256(b"x").digest()

        def m(what: str, manifest: ChunkManifest, reason: str) -> Hostile:
            return Hostile(f"manifest: {what}", topic, self.seal(Kind.MANIFEST, round_, manifest),
                           frozenset({reason}))

        yield m("a terabyte", ChunkManifest("update", 2**40, 2**20, (h32,) * 4, h32), "too_large")
        yield m("100,000 chunks", ChunkManifest("update", 100_000, 1, (h32,) * 100_000, h32), "too_large")
        yield m("chunk count does not add up", ChunkManifest("update", 1000, 100, (h32,) * 3, h32), "bad_manifest")
        yield m("hashes not SHA-256", ChunkManifest("update", 10, 5, (b"12345",) * 2, b"123"), "bad_manifest")
        yield m("a chunked model", ChunkManifest("model", 10, 5, (h32,) * 2, h32), "bad_kind")
        for i in range(3):
            yield Hostile(f"chunk {i} no manifest names", chunk_topic, bytes([i]) * 5000,
                          frozenset({"unknown_chunk"}))
        # A well-formed chunked transfer of a hostile update: refused once assembled.
        whole = self.seal(Kind.UPDATE, round_, self.update(round_, version, num_samples=2**62))
        manifest, chunks = split(whole, len(whole) // 2 + 1, Kind.UPDATE.value)
        yield Hostile("chunked 2**62 update", topic, self.seal(Kind.MANIFEST, round_, manifest),
                      frozenset({"bad_samples"}))
        for c in chunks:
            yield Hostile("its chunk", chunk_topic, c, frozenset(), counted=False)


def every(mallory: Mallory, current: Current) -> Iterator[Hostile]:
    """The whole attack; ``current()`` is the (round, model version, lineage) last announced,
    read again before each group so that most updates meet their own check."""
    yield from mallory.updates(*current()[:2])
    yield from mallory.statistics(current()[0], current()[2], in_round=False)
    yield from mallory.canary_reports(*current()[:2])
    yield from mallory.statuses()
    yield from mallory.manifests(*current()[:2])
    yield from mallory.near_limit(current, count=40)
    yield from mallory.flood(current, count=300)
