"""What the gateway checks on every message from the aggregator and adds to its own.

``open_from_aggregator`` decodes bounded, checks the kind and that the sender is the
aggregator identity and - with a keyring - the aggregator's Ed25519 signature (revoked
keys refused). Replays of aggregator messages are harmless here by construction: the
participant ignores older rounds and installs only newer model versions whose parent hash
chains to the installed one, so no message-id guard is kept (retained messages are
legitimately re-delivered on every reconnect). ``sign`` signs this gateway's updates and
status messages with its own key.
"""

from __future__ import annotations

from pathlib import Path

from fedcore.errors import RemoteProtocolError
from fedcore.protocol import codec, signing
from fedcore.protocol.messages import Kind


class EdgeSecurity:
    def __init__(
        self,
        aggregator_id: str = "aggregator",
        limits: codec.Limits = codec.Limits(),
        keyring: signing.Keyring | None = None,
        signing_key: signing.SigningKey | None = None,
    ) -> None:
        self.aggregator_id = keyring.aggregator_id if keyring is not None else aggregator_id
        self.limits = limits
        self.keyring = keyring
        self.signing_key = signing_key

    @classmethod
    def from_paths(cls, file: str, paths: dict[str, Path]) -> EdgeSecurity:
        keyring, key = signing.load_credentials(file, paths)
        return cls(keyring=keyring, signing_key=key)

    def open_from_aggregator(self, payload: bytes, kind: Kind) -> codec.Envelope:
        env = codec.decode(payload, self.limits)
        if env.kind != kind.value:
            raise RemoteProtocolError("bad_kind", f"{env.kind!r} on a {kind.value} topic")
        if self.keyring is not None:
            signing.authenticate(env, self.keyring, None)
        elif env.sender != self.aggregator_id:
            raise RemoteProtocolError("sender_mismatch", f"{env.sender!r} is not the aggregator")
        return env

    def sign(self, env: codec.Envelope) -> codec.Envelope:
        return signing.sign(env, self.signing_key) if self.signing_key is not None else env
