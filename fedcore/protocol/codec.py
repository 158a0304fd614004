"""The versioned envelope and its codec. Every fedgate message is one Envelope.

``encode(env)`` -> msgpack bytes; ``decode(data, limits)`` -> Envelope, bounded: the raw size
is checked before parsing, msgspec validates the schema, and unknown versions and kinds are
refused. Bodies are decoded separately with :func:`decode_body` against the kind's schema.
Signing covers :func:`signed_bytes` (every header field plus the body, without the
signature), see ``fedcore.protocol.signing``.

Every failure is a :class:`RemoteProtocolError` whose ``reason`` is a stable counter key:
``too_large``, ``malformed``, ``bad_version``, ``bad_kind``, ``bad_body``...
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from fedcore.errors import RemoteProtocolError
from fedcore.protocol.messages import BODY_TYPES, Kind

PROTOCOL_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Message ids are kept (replay guard, round state, checkpoint): ours are 16 hex digits, and
# a longer one would let a peer grow what is kept per message by up to the message size.
MAX_MESSAGE_ID = 64

B = TypeVar("B", bound=msgspec.Struct)


class Envelope(msgspec.Struct, frozen=True, array_like=True):
    version: int
    kind: str
    fleet: str
    task: str
    round: int
    sender: str
    message_id: str
    timestamp: float
    body: bytes
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_elements: int = 16 * 1024 * 1024


_encoder = msgspec.msgpack.Encoder()
_env_decoder = msgspec.msgpack.Decoder(Envelope)
_body_decoders = {k: msgspec.msgpack.Decoder(t) for k, t in BODY_TYPES.items()}


def new_message_id() -> str:
    return os.urandom(8).hex()  # unique per sender within the replay window


def make_envelope(
    kind: Kind,
    fleet: str,
    task: str,
    round: int,
    sender: str,
    body: msgspec.Struct,
    timestamp: float,
    message_id: str | None = None,
) -> Envelope:
    if type(body) is not BODY_TYPES[kind]:
        raise TypeError(f"body {type(body).__name__} does not match kind {kind.value}")
    return Envelope(
        version=PROTOCOL_VERSION,
        kind=kind.value,
        fleet=fleet,
        task=task,
        round=round,
        sender=sender,
        message_id=message_id or new_message_id(),
        timestamp=timestamp,
        body=_encoder.encode(body),
    )


def encode(env: Envelope) -> bytes:
    return _encoder.encode(env)


def signed_bytes(env: Envelope) -> bytes:
    """The canonical bytes a signature covers: every field but the signature."""
    return _encoder.encode(
        (env.version, env.kind, env.fleet, env.task, env.round, env.sender,
         env.message_id, env.timestamp, env.body)
    )


def decode(data: bytes, limits: Limits = Limits()) -> Envelope:
    if len(data) > limits.max_message_bytes:
        raise RemoteProtocolError(
            "too_large", f"{len(data)} bytes (max {limits.max_message_bytes})"
        )
    try:
        env = _env_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:  # bad UTF-8 in a str field
        raise RemoteProtocolError("malformed", f"envelope: {exc}") from None
    if env.version != PROTOCOL_VERSION:
        raise RemoteProtocolError("bad_version", f"protocol version {env.version} (speak {PROTOCOL_VERSION})")
    if not 0 < len(env.message_id) <= MAX_MESSAGE_ID:
        raise RemoteProtocolError("malformed", f"message id of {len(env.message_id)} characters (1..{MAX_MESSAGE_ID})")
    try:
        Kind(env.kind)
    except ValueError:
        raise RemoteProtocolError("bad_kind", f"unknown message kind {env.kind!r}") from None
    return env


def decode_body(env: Envelope, expected: type[B]) -> B:
    """Decode the body of ``env``, which must be of the kind whose schema is ``expected``."""
    kind = Kind(env.kind)
    if BODY_TYPES[kind] is not expected:
        raise RemoteProtocolError("bad_kind", f"expected {expected.__name__}, got kind {env.kind!r}")
    try:
        body = _body_decoders[kind].decode(env.body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:  # bad UTF-8 in a str field
        raise RemoteProtocolError("bad_body", f"{kind.value}: {exc}") from None
    assert isinstance(body, expected)
    return body


def encode_body(body: msgspec.Struct) -> bytes:
    return _encoder.encode(body)


def body_hash(body: msgspec.Struct) -> bytes:
    """SHA-256 of a body's canonical encoding (model chain: ``GlobalModel.parent_hash``)."""
    return hashlib.sha256(_encoder.encode(body)).digest()
