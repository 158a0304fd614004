"""What the gateway checks on every message from the aggregator and adds to its own.

``open_from_aggregator`` decodes bounded, checks the kind and that the sender is the
aggregator identity; signatures and the model chain plug in here when a keyring is
configured, so the runtime loop is the same with or without them.
"""

from __future__ import annotations

from fedcore.errors import RemoteProtocolError
from fedcore.protocol import codec
from fedcore.protocol.messages import GlobalModel, Kind


class EdgeSecurity:
    def __init__(self, aggregator_id: str = "aggregator", limits: codec.Limits = codec.Limits()) -> None:
        self.aggregator_id = aggregator_id
        self.limits = limits

    def open_from_aggregator(self, payload: bytes, kind: Kind) -> codec.Envelope:
        env = codec.decode(payload, self.limits)
        if env.kind != kind.value:
            raise RemoteProtocolError("bad_kind", f"{env.kind!r} on a {kind.value} topic")
        if env.sender != self.aggregator_id:
            raise RemoteProtocolError("sender_mismatch", f"{env.sender!r} is not the aggregator")
        return env

    def check_model(self, model: GlobalModel) -> GlobalModel:
        return model

    def sign(self, env: codec.Envelope) -> codec.Envelope:
        return env
