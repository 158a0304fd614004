"""What the aggregator checks on every inbound message and adds to every outbound one.

``open`` turns untrusted bytes into an envelope: bounded decode, kind check, sender bound
to the topic's device id, and - when a keyring is configured - the Ed25519 signature
against the fleet keyring (revoked keys refused) and the replay guard (a message id seen
before, or a round older than the guard's window). ``sign`` signs every outbound envelope
with the aggregator's key. Rejections, accepted updates, quarantines and model commits go
to the hash-chained audit log when one is configured. The replay guard's state travels in
the checkpoint, so a restarted aggregator still refuses what it had already accepted.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from aggregator.audit import AuditLog
from aggregator.rounds import Checkpoint
from fedcore.errors import RemoteProtocolError
from fedcore.learning.params import Params, Shapes
from fedcore.pipeline import decode_update
from fedcore.protocol import codec, signing
from fedcore.protocol.messages import EncodedDelta, Kind

log = logging.getLogger("fedgate.aggregator")

MAX_REJECTION_LINES = 32  # audit lines per sender (device or topic) between two round announcements


class AggregatorSecurity:
    def __init__(
        self,
        limits: codec.Limits = codec.Limits(),
        keyring: signing.Keyring | None = None,
        signing_key: signing.SigningKey | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.limits = limits
        self.keyring = keyring
        self.signing_key = signing_key
        self.guard = signing.ReplayGuard() if keyring is not None else None
        self.audit_log = audit
        # rejection lines written per sender since the last round announcement, and what
        # was only counted beyond MAX_REJECTION_LINES (reasons are a fixed set of names)
        self._rejection_lines: Counter[str] = Counter()
        self._suppressed: dict[str, Counter[str]] = {}

    @classmethod
    def from_paths(cls, file: str, paths: dict[str, Path], audit_path: Path | None,
                   limits: codec.Limits = codec.Limits()) -> AggregatorSecurity:
        keyring, key = signing.load_credentials(file, paths)
        audit = None
        if audit_path is not None:
            audit_path.parent.mkdir(parents=True, exist_ok=True)
            audit = AuditLog(audit_path)
        return cls(limits=limits, keyring=keyring, signing_key=key, audit=audit)

    def open(self, payload: bytes, topic_device: str, kinds: Kind | tuple[Kind, ...]) -> codec.Envelope:
        """Decode and authenticate a device's message whose kind must be one of ``kinds``."""
        allowed = (kinds,) if isinstance(kinds, Kind) else kinds
        env = codec.decode(payload, self.limits)
        if env.kind not in {k.value for k in allowed}:
            raise RemoteProtocolError("bad_kind", f"{env.kind[:20]!r} on a {allowed[0].value} topic")
        if self.keyring is None:
            signing.verify_sender(env, topic_device)
        else:
            # Only updates count rounds: status messages are retained and re-delivered on
            # every reconnect, statistics and canary reports are idempotent by design.
            guard = self.guard if env.kind == Kind.UPDATE.value else None
            signing.authenticate(env, self.keyring, guard, topic_device)
        return env

    def sign(self, env: codec.Envelope) -> codec.Envelope:
        return signing.sign(env, self.signing_key) if self.signing_key is not None else env

    def on_round(self, round_: int, ts: float) -> None:
        if self.guard is not None:
            self.guard.advance(round_)
        self._flush_suppressed(round_, ts)

    def decode_delta(self, encoded: EncodedDelta, shapes: Shapes) -> Params:
        return decode_update(encoded, shapes, self.limits)

    def audit(self, kind: str, ts: float, **fields: Any) -> None:
        if self.audit_log is not None:
            self.audit_log.append(kind, ts, **fields)

    def audit_rejection(self, who: str, reason: str, detail: str, ts: float) -> None:
        """One line per rejection, up to MAX_REJECTION_LINES per sender between two round
        announcements; the rest are counted by reason and written as one
        ``rejections_suppressed`` line at the next announcement. A flood therefore costs
        the log (and its fsyncs) a bounded number of lines per round, and every rejection
        is still accounted for in the chain."""
        if self.audit_log is None:
            return
        if self._rejection_lines[who] < MAX_REJECTION_LINES:
            self._rejection_lines[who] += 1
            self.audit("rejection", ts, who=who, reason=reason, detail=detail[:200])
        else:
            self._suppressed.setdefault(who, Counter())[reason] += 1

    def _flush_suppressed(self, round_: int, ts: float) -> None:
        for who, counts in sorted(self._suppressed.items()):
            self.audit("rejections_suppressed", ts, who=who, reasons=dict(sorted(counts.items())),
                       before_round=round_)
        self._suppressed = {}
        self._rejection_lines = Counter()

    def before_checkpoint(self, checkpoint: Checkpoint) -> None:
        if self.guard is not None:
            checkpoint.meta["replay_guard"] = self.guard.to_state()

    def restore(self, meta: dict[str, Any]) -> None:
        if self.keyring is not None and meta.get("replay_guard"):
            self.guard = signing.ReplayGuard.from_state(meta["replay_guard"])
