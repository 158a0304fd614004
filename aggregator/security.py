"""What the aggregator checks on every inbound message and adds to every outbound one.

``open`` turns untrusted bytes into an envelope: bounded decode, kind check, the sender
must be the device named by the topic. Signing, replay protection, the audit log, the
update pipeline's decoder and the privacy ledger plug in here, so the runtime's loop stays
the same whichever are configured.
"""

from __future__ import annotations

from typing import Any

from fedcore.errors import RemoteProtocolError
from fedcore.learning.params import Params, Shapes
from fedcore.protocol import codec
from fedcore.protocol.messages import EncodedDelta, Kind, RoundSummary

from fedcore.pipeline import decode_update

from aggregator.rounds import Checkpoint


class AggregatorSecurity:
    def __init__(self, limits: codec.Limits = codec.Limits()) -> None:
        self.limits = limits

    def open(self, payload: bytes, topic_device: str, kind: Kind) -> codec.Envelope:
        env = codec.decode(payload, self.limits)
        if env.kind != kind.value:
            raise RemoteProtocolError("bad_kind", f"{env.kind!r} on a {kind.value} topic")
        if env.sender != topic_device:
            raise RemoteProtocolError("sender_mismatch", f"{env.sender!r} on {topic_device!r}'s topic")
        return env

    def sign(self, env: codec.Envelope) -> codec.Envelope:
        return env

    def decode_delta(self, encoded: EncodedDelta, shapes: Shapes) -> Params:
        return decode_update(encoded, shapes, self.limits)

    def audit(self, kind: str, ts: float, **fields: Any) -> None:
        pass

    def audit_rejection(self, who: str, reason: str, detail: str, ts: float) -> None:
        self.audit("rejection", ts, who=who, reason=reason, detail=detail)

    def on_accepted(self, device: str, round_: int) -> None:
        pass

    def enrich_summary(self, summary: RoundSummary) -> RoundSummary:
        return summary

    def before_checkpoint(self, checkpoint: Checkpoint) -> None:
        pass
