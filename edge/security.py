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
    def from_paths(cls, file: str, paths: dict[str, Path], limits: codec.Limits = codec.Limits()) -> EdgeSecurity:
        keyring, key = signing.load_credentials(file, paths)
        return cls(limits=limits, keyring=keyring, signing_key=key)

    def open_from_aggregator(self, payload: bytes, kinds: Kind | tuple[Kind, ...]) -> codec.Envelope:
        """Decode and authenticate an aggregator message whose kind must be one of ``kinds``
        (a chunk manifest is bound to the aggregator here: its kind is not one only the
        aggregator sends)."""
        allowed = (kinds,) if isinstance(kinds, Kind) else kinds
        env = codec.decode(payload, self.limits)
        if env.kind not in {k.value for k in allowed}:
            raise RemoteProtocolError("bad_kind", f"{env.kind!r} on a {allowed[0].value} topic")
        if env.sender != self.aggregator_id:
            raise RemoteProtocolError("sender_mismatch", f"{env.sender!r} is not the aggregator")
        if self.keyring is not None:
            signing.authenticate(env, self.keyring, None)
        return env

    def sign(self, env: codec.Envelope) -> codec.Envelope:
        return signing.sign(env, self.signing_key) if self.signing_key is not None else env
