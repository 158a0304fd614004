"""Ed25519 signatures on envelopes, the fleet keyring, replay protection and the model chain.

Theory of operation
-------------------
Every envelope is signed by its sender over :func:`fedcore.protocol.codec.signed_bytes`
(every header field plus the body; only the signature itself is left out). A receiver runs,
in this order:

1. :func:`verify_sender` - the envelope's ``sender`` must be the device named by the topic
   it arrived on (the broker ACL guarantees who may publish on a topic; this binds the
   signed identity to that topic) -> ``sender_mismatch``.
2. :func:`verify` against the :class:`Keyring` loaded from the provisioning output ->
   ``unsigned``, ``unknown_key``, ``revoked``, ``bad_signature``. Messages only the
   aggregator may send (round, model, metrics) go through :func:`verify_from_aggregator`.
3. :meth:`ReplayGuard.check` - only *after* the signature is good, so that forged messages
   cannot burn another sender's message ids -> ``replayed``, ``stale_round``.
4. For a global model: :func:`check_model_successor` -> ``stale_model``, ``bad_parent``.

:func:`authenticate` runs steps 1-3. Every rejection is a
:class:`~fedcore.errors.RemoteProtocolError` with a stable ``reason`` counter key.

The module is pure: keys are generated from a seed the caller supplies, the replay guard is
advanced by the caller's round state machine, never by incoming messages (a signed but
malicious gateway must not be able to push the window forward and make everyone stale).
:func:`load_keyring` is the one file-reading helper, called once at a process edge.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from fedcore.errors import ConfigError, RemoteProtocolError
from fedcore.protocol import codec
from fedcore.protocol.messages import GlobalModel, Kind

KEYRING_FORMAT = "fedgate-keyring/1"
REVOCATIONS_FORMAT = "fedgate-revocations/1"
SIGNATURE_BYTES = 64
# Kinds only the aggregator identity may send (mirrors the ACL: aggregator-only writes).
AGGREGATOR_KINDS = frozenset({
    Kind.ROUND.value, Kind.MODEL.value, Kind.METRICS.value, Kind.DEPLOYMENT.value,
    Kind.DEPLOYED.value, Kind.STATE.value,
})


class VerifyKey:
    """An Ed25519 public key (32 raw bytes)."""

    __slots__ = ("_key", "raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
        self.raw = bytes(raw)
        self._key = eddsa.import_public_key(self.raw)

    @classmethod
    def from_hex(cls, text: str) -> VerifyKey:
        return cls(bytes.fromhex(text))

    def hex(self) -> str:
        return self.raw.hex()

    def fingerprint(self) -> str:
        """Short stable id of the key (first 16 hex digits of its SHA-256)."""
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def is_valid(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != SIGNATURE_BYTES:
            return False
        try:
            eddsa.new(self._key, "rfc8032").verify(message, signature)
        except ValueError:
            return False
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.fingerprint()})"


class SigningKey:
    """An Ed25519 private key. Build it from 32 random bytes (``from_seed``) or a PEM file."""

    __slots__ = ("_key", "verify_key")

    def __init__(self, key: ECC.EccKey) -> None:
        if key.curve != "Ed25519" or not key.has_private():
            raise ValueError("not an Ed25519 private key")
        self._key = key
        self.verify_key = VerifyKey(key.public_key().export_key(format="raw"))

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(eddsa.import_private_key(seed))

    @classmethod
    def from_pem(cls, pem: str | bytes) -> SigningKey:
        text = pem.decode("ascii") if isinstance(pem, bytes) else pem
        return cls(ECC.import_key(text))

    def to_pem(self) -> str:
        """PKCS#8 PEM, readable by OpenSSL (`openssl pkey -in FILE`)."""
        return str(self._key.export_key(format="PEM"))

    def sign_bytes(self, message: bytes) -> bytes:
        return bytes(eddsa.new(self._key, "rfc8032").sign(message))

    def __repr__(self) -> str:
        return f"SigningKey(public={self.verify_key.fingerprint()})"


def sign(envelope: codec.Envelope, key: SigningKey) -> codec.Envelope:
    """Return ``envelope`` with its signature over :func:`codec.signed_bytes` filled in."""
    signature = key.sign_bytes(codec.signed_bytes(envelope))
    return codec.Envelope(
        envelope.version, envelope.kind, envelope.fleet, envelope.task, envelope.round,
        envelope.sender, envelope.message_id, envelope.timestamp, envelope.body, signature,
    )


@dataclass(frozen=True)
class Keyring:
    """Who may sign: device id -> public key, the aggregator's key, and revoked keys.

    Revocation is by key (hex), so a gateway re-provisioned under the same name with a fresh
    key is trusted again while its stolen old key stays dead.
    """

    devices: Mapping[str, VerifyKey]
    aggregator_id: str
    aggregator_key: VerifyKey | None
    revoked: frozenset[str] = field(default_factory=frozenset)

    def key_for(self, sender: str) -> VerifyKey:
        if sender == self.aggregator_id and self.aggregator_key is not None:
            return self.aggregator_key
        key = self.devices.get(sender)
        if key is None:
            raise RemoteProtocolError("unknown_key", f"no public key for sender {sender[:80]!r}")
        return key

    def is_revoked(self, key: VerifyKey) -> bool:
        return key.hex() in self.revoked

    @classmethod
    def from_json(cls, keyring_text: str | bytes, revocations_text: str | bytes | None = None) -> Keyring:
        """Parse ``keyring.json`` (and ``revoked.json``). Raises ValueError on a bad file."""
        data = json.loads(keyring_text)
        if not isinstance(data, dict) or data.get("format") != KEYRING_FORMAT:
            raise ValueError(f"not a {KEYRING_FORMAT} document")
        agg = data.get("aggregator") or {}
        devices = {str(name): VerifyKey.from_hex(str(hexkey)) for name, hexkey in data.get("devices", {}).items()}
        revoked: set[str] = set()
        if revocations_text is not None:
            revoked = set(parse_revocations(revocations_text))
        agg_key = agg.get("public_key")
        return cls(
            devices=devices,
            aggregator_id=str(agg.get("id", "aggregator")),
            aggregator_key=VerifyKey.from_hex(str(agg_key)) if agg_key else None,
            revoked=frozenset(revoked),
        )


def parse_revocations(text: str | bytes) -> list[str]:
    """The revoked public keys (hex) listed in a ``revoked.json`` document."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != REVOCATIONS_FORMAT:
        raise ValueError(f"not a {REVOCATIONS_FORMAT} document")
    return [str(entry["public_key"]) for entry in data.get("revoked", []) if entry.get("public_key")]


def load_keyring(keyring_path: str | Path, revocations_path: str | Path | None = None) -> Keyring:
    """Read the keyring and its revocation list (default: ``revoked.json`` next to it).

    A missing revocation list is a config error, not "nothing revoked": failing open would
    silently trust stolen keys.
    """
    kp = Path(keyring_path)
    rp = Path(revocations_path) if revocations_path is not None else kp.with_name("revoked.json")
    try:
        keyring_text = kp.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(str(kp), "<file>", str(kp), f"cannot read keyring: {exc.strerror}") from exc
    try:
        revocations_text = rp.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(str(rp), "<file>", str(rp), f"cannot read revocation list: {exc.strerror}") from exc
    try:
        return Keyring.from_json(keyring_text, revocations_text)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(str(kp), "<file>", str(kp), f"bad keyring or revocation list: {exc}") from exc


def load_credentials(
    config_file: str, paths: Mapping[str, Path]
) -> tuple[Keyring | None, SigningKey | None]:
    """A service's ``[security]`` table: the fleet keyring (``keyring``, ``revocations``) and
    its own signing key (``signing_key``). Both or neither: a service that verifies others
    but does not sign (or the reverse) would be half-secured without saying so."""
    keyring = key = None
    if "keyring" in paths:
        keyring = load_keyring(paths["keyring"], paths.get("revocations"))
    if "signing_key" in paths:
        try:
            key = SigningKey.from_pem(Path(paths["signing_key"]).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(config_file, "security.signing_key", str(paths["signing_key"]),
                              f"cannot load the Ed25519 key: {exc}") from None
    if (keyring is None) != (key is None):
        raise ConfigError(config_file, "security", sorted(paths),
                          "keyring and signing_key go together (verify theirs, sign ours)")
    return keyring, key


def verify_sender(envelope: codec.Envelope, topic_device: str | None) -> None:
    """The signed sender must be the device whose topic the message arrived on."""
    if topic_device is not None and envelope.sender != topic_device:
        raise RemoteProtocolError(
            "sender_mismatch", f"sender {envelope.sender[:80]!r} on the topic of {topic_device!r}"
        )


def verify(envelope: codec.Envelope, keyring: Keyring) -> None:
    """Check the envelope's signature against the sender's key in ``keyring``."""
    if not envelope.signature:
        raise RemoteProtocolError("unsigned", f"{envelope.kind[:20]} from {envelope.sender[:80]!r}")
    key = keyring.key_for(envelope.sender)
    if keyring.is_revoked(key):
        raise RemoteProtocolError("revoked", f"key {key.fingerprint()} of {envelope.sender!r} is revoked")
    if not key.is_valid(codec.signed_bytes(envelope), envelope.signature):
        raise RemoteProtocolError("bad_signature", f"{envelope.kind[:20]} from {envelope.sender!r}")


def verify_from_aggregator(envelope: codec.Envelope, keyring: Keyring) -> None:
    """Like :func:`verify`, and the sender must be the aggregator (round, model, metrics)."""
    if envelope.sender != keyring.aggregator_id:
        raise RemoteProtocolError(
            "sender_mismatch", f"{envelope.kind[:20]} must come from {keyring.aggregator_id!r}"
        )
    verify(envelope, keyring)


class ReplayGuard:
    """Rejects reused message ids and rounds older than a window. Pure and checkpointable.

    ``current_round`` is moved only by :meth:`advance` (the caller's round state machine).
    Message ids are remembered per sender, per round, in an LRU of at most ``max_ids``
    entries; ids of rounds that fell out of the window are forgotten because those rounds
    are refused as ``stale_round`` anyway - so memory is bounded by the window, not by time.
    """

    def __init__(self, window_rounds: int = 2, max_ids: int = 65536, current_round: int = 0) -> None:
        if window_rounds < 1 or max_ids < 1:
            raise ValueError("window_rounds and max_ids must be >= 1")
        self.window_rounds = window_rounds
        self.max_ids = max_ids
        self.current_round = current_round
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()

    @property
    def oldest_round(self) -> int:
        return self.current_round - self.window_rounds + 1

    def advance(self, round_: int) -> None:
        """Move the window forward to ``round_`` (never backwards) and forget old ids."""
        if round_ <= self.current_round:
            return
        self.current_round = round_
        oldest = self.oldest_round
        for key in [k for k, r in self._seen.items() if r < oldest]:
            del self._seen[key]

    def check(self, envelope: codec.Envelope) -> None:
        """Admit ``envelope`` once; raise ``stale_round`` or ``replayed`` otherwise."""
        if envelope.round < self.oldest_round:
            raise RemoteProtocolError(
                "stale_round", f"round {envelope.round} < oldest accepted {self.oldest_round}"
            )
        key = (envelope.sender, envelope.message_id)
        if key in self._seen:
            self._seen.move_to_end(key)
            raise RemoteProtocolError("replayed", f"message id {envelope.message_id[:40]!r} from {envelope.sender[:80]!r}")
        self._seen[key] = envelope.round
        if len(self._seen) > self.max_ids:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)

    def to_state(self) -> dict[str, Any]:
        """JSON-able state for the aggregator's checkpoint (oldest id first)."""
        return {
            "window_rounds": self.window_rounds,
            "max_ids": self.max_ids,
            "current_round": self.current_round,
            "seen": [[s, m, r] for (s, m), r in self._seen.items()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ReplayGuard:
        guard = cls(int(state["window_rounds"]), int(state["max_ids"]), int(state["current_round"]))
        for sender, message_id, round_ in state.get("seen", []):
            guard._seen[(str(sender), str(message_id))] = int(round_)
        return guard


def authenticate(
    envelope: codec.Envelope,
    keyring: Keyring,
    guard: ReplayGuard | None,
    topic_device: str | None = None,
) -> None:
    """Sender binding, signature, then replay check - the order matters (see module doc)."""
    verify_sender(envelope, topic_device)
    if envelope.kind in AGGREGATOR_KINDS:
        verify_from_aggregator(envelope, keyring)
    else:
        verify(envelope, keyring)
    if guard is not None:
        guard.check(envelope)


def model_hash(global_model_body: bytes) -> bytes:
    """SHA-256 of a GlobalModel body as it travels (``Envelope.body``): the chain link.

    Equal to ``codec.body_hash(model)`` for a body encoded by this codec.
    """
    return hashlib.sha256(global_model_body).digest()


def check_model_successor(
    new: GlobalModel,
    installed_version: int | None,
    installed_hash: bytes | None,
    new_hash: bytes | None = None,
    allow_gap: bool = True,
) -> bool:
    """May ``new`` replace the installed model? True: install it. False: it *is* the installed one.

    Raises ``stale_model`` for an older version (or the same version with other content) and
    ``bad_parent`` when the next version does not name the installed model as its parent.
    A gateway that was offline for some versions cannot check the link it never saw; with
    ``allow_gap`` it accepts a newer version on the strength of the aggregator's signature.
    """
    if installed_version is None:
        return True
    if new.version < installed_version:
        raise RemoteProtocolError("stale_model", f"version {new.version} < installed {installed_version}")
    if new.version == installed_version:
        if new_hash is not None and installed_hash is not None and new_hash != installed_hash:
            raise RemoteProtocolError("stale_model", f"version {new.version} is installed with other content")
        return False
    if new.version == installed_version + 1 or not allow_gap:
        if installed_hash is None or new.parent_hash != installed_hash:
            raise RemoteProtocolError(
                "bad_parent", f"version {new.version} does not descend from installed {installed_version}"
            )
    return True


def keyring_document(
    devices: Mapping[str, VerifyKey], aggregator_id: str, aggregator_key: VerifyKey | None
) -> dict[str, Any]:
    """The ``keyring.json`` document (written by provisioning)."""
    return {
        "format": KEYRING_FORMAT,
        "aggregator": {"id": aggregator_id, "public_key": aggregator_key.hex() if aggregator_key else None},
        "devices": {name: key.hex() for name, key in sorted(devices.items())},
    }


def revocations_document(entries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``revoked.json`` document: entries with id, public_key, cert_serial, revoked_at."""
    return {"format": REVOCATIONS_FORMAT, "revoked": [dict(e) for e in entries]}
