"""Envelope signatures, keyring, replay guard and model chain (pure, no files but tmp_path)."""

from __future__ import annotations

import json

import msgspec
import pytest

from fedcore.errors import ConfigError, RemoteProtocolError
from fedcore.protocol import codec, signing
from fedcore.protocol.messages import GlobalModel, Kind, ModelSpec, Status

# RFC 8032, section 7.1, test 1 (empty message).
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def key(n: int) -> signing.SigningKey:
    return signing.SigningKey.from_seed(bytes([n]) * 32)


GW1, GW2, AGG, OLD = key(1), key(2), key(3), key(4)


def keyring(revoked: frozenset[str] = frozenset()) -> signing.Keyring:
    return signing.Keyring(
        devices={"gw1": GW1.verify_key, "gw2": GW2.verify_key},
        aggregator_id="aggregator",
        aggregator_key=AGG.verify_key,
        revoked=revoked,
    )


def status_env(sender: str = "gw1", round_: int = 3, message_id: str | None = None) -> codec.Envelope:
    return codec.make_envelope(
        Kind.STATUS, "plant", "task", round_, sender, Status("online"), timestamp=10.0, message_id=message_id
    )


def reason(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteProtocolError) as info:
        fn(*args)
    return info.value.reason


def test_rfc8032_vector() -> None:
    k = signing.SigningKey.from_seed(RFC_SEED)
    assert k.verify_key.raw == RFC_PUBLIC
    assert k.sign_bytes(b"") == RFC_SIGNATURE
    assert signing.VerifyKey(RFC_PUBLIC).is_valid(b"", RFC_SIGNATURE)
    assert not signing.VerifyKey(RFC_PUBLIC).is_valid(b"x", RFC_SIGNATURE)


def test_pem_round_trip() -> None:
    again = signing.SigningKey.from_pem(GW1.to_pem())
    assert again.verify_key == GW1.verify_key
    assert "BEGIN PRIVATE KEY" in GW1.to_pem()


def test_signed_envelope_survives_the_wire_and_verifies() -> None:
    env = signing.sign(status_env(), GW1)
    assert len(env.signature) == 64
    received = codec.decode(codec.encode(env))
    signing.verify(received, keyring())
    signing.verify_sender(received, "gw1")


@pytest.mark.parametrize(
    "field, value",
    [("version", 2), ("kind", "telemetry"), ("fleet", "other"), ("task", "t2"), ("round", 4),
     ("sender", "gw2"), ("message_id", "abc"), ("timestamp", 11.0), ("body", b"\x80")],
)
def test_every_signed_field_is_covered(field: str, value: object) -> None:
    env = signing.sign(status_env(), GW1)
    tampered = msgspec.structs.replace(env, **{field: value})
    assert tampered != env
    assert reason(signing.verify, tampered, keyring()) == "bad_signature"


def test_rejections_carry_their_reason() -> None:
    ring = keyring()
    assert reason(signing.verify, status_env(), ring) == "unsigned"
    assert reason(signing.verify, signing.sign(status_env("gw9"), OLD), ring) == "unknown_key"
    forged = signing.sign(status_env("gw1"), GW2)  # gw2 claims to be gw1
    assert reason(signing.verify, forged, ring) == "bad_signature"
    short = msgspec.structs.replace(signing.sign(status_env(), GW1), signature=b"\x01" * 10)
    assert reason(signing.verify, short, ring) == "bad_signature"
    revoked_ring = keyring(frozenset({GW1.verify_key.hex()}))
    assert reason(signing.verify, signing.sign(status_env(), GW1), revoked_ring) == "revoked"
    signing.verify(signing.sign(status_env("gw2"), GW2), revoked_ring)  # others unaffected
    assert reason(signing.verify_sender, signing.sign(status_env("gw1"), GW1), "gw2") == "sender_mismatch"


def test_only_the_aggregator_may_send_models() -> None:
    ring = keyring()
    model = GlobalModel(1, 1, b"", ModelSpec("mlp", (2, 1)), ())
    env = codec.make_envelope(Kind.MODEL, "plant", "task", 1, "gw1", model, timestamp=0.0)
    device_signed = signing.sign(env, GW1)
    signing.verify(device_signed, ring)  # a valid device signature ...
    assert reason(signing.authenticate, device_signed, ring, None) == "sender_mismatch"  # ... is not enough
    agg_env = codec.make_envelope(Kind.MODEL, "plant", "task", 1, "aggregator", model, timestamp=0.0)
    signing.authenticate(signing.sign(agg_env, AGG), ring, None)
    assert reason(signing.authenticate, signing.sign(agg_env, GW1), ring, None) == "bad_signature"


def test_keyring_documents_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    doc = signing.keyring_document({"gw1": GW1.verify_key, "gw2": GW2.verify_key}, "aggregator", AGG.verify_key)
    rev = signing.revocations_document([{"id": "gw2", "public_key": GW2.verify_key.hex(), "cert_serial": "7", "revoked_at": "x"}])
    (tmp_path / "keyring.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError):  # no revocation list: fail closed
        signing.load_keyring(tmp_path / "keyring.json")
    (tmp_path / "revoked.json").write_text(json.dumps(rev))
    ring = signing.load_keyring(tmp_path / "keyring.json")
    assert ring.key_for("gw1") == GW1.verify_key
    assert ring.key_for("aggregator") == AGG.verify_key
    assert ring.is_revoked(GW2.verify_key) and not ring.is_revoked(GW1.verify_key)
    (tmp_path / "keyring.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConfigError):
        signing.load_keyring(tmp_path / "keyring.json")


def test_replay_guard_rejects_reuse_and_old_rounds() -> None:
    guard = signing.ReplayGuard(window_rounds=2)
    guard.advance(5)
    guard.check(status_env(round_=5, message_id="a"))
    assert reason(guard.check, status_env(round_=5, message_id="a")) == "replayed"
    guard.check(status_env(sender="gw2", round_=5, message_id="a"))  # ids are per sender
    guard.check(status_env(round_=4, message_id="b"))  # inside the window
    assert reason(guard.check, status_env(round_=3, message_id="c")) == "stale_round"
    guard.advance(4)  # never backwards
    assert guard.current_round == 5
    guard.advance(6)  # round 4 ids fall out of the window and are forgotten
    assert len(guard) == 2
    assert reason(guard.check, status_env(round_=4, message_id="b")) == "stale_round"


def test_replay_guard_memory_is_bounded_and_state_is_json() -> None:
    guard = signing.ReplayGuard(window_rounds=1, max_ids=100)
    for i in range(250):
        guard.check(status_env(message_id=f"m{i}", round_=0))
    assert len(guard) == 100
    assert reason(guard.check, status_env(message_id="m249", round_=0)) == "replayed"
    state = json.loads(json.dumps(guard.to_state()))
    restored = signing.ReplayGuard.from_state(state)
    assert reason(restored.check, status_env(message_id="m200", round_=0)) == "replayed"
    restored.check(status_env(message_id="m0", round_=0))  # evicted by the LRU bound
    assert restored.to_state()["current_round"] == 0


def test_model_chain() -> None:
    spec = ModelSpec("mlp", (2, 1))
    v1 = GlobalModel(1, 1, b"", spec, ())
    v1_hash = signing.model_hash(codec.encode_body(v1))
    v2 = GlobalModel(2, 2, v1_hash, spec, ())
    assert signing.check_model_successor(v1, None, None)  # first install
    assert signing.check_model_successor(v2, 1, v1_hash)
    assert not signing.check_model_successor(v1, 1, v1_hash, new_hash=v1_hash)  # already installed
    assert reason(signing.check_model_successor, v1, 2, b"x" * 32) == "stale_model"
    other_v1 = signing.model_hash(codec.encode_body(GlobalModel(1, 9, b"", spec, ())))
    assert reason(signing.check_model_successor, v1, 1, v1_hash, other_v1) == "stale_model"
    forged_v2 = GlobalModel(2, 2, b"\x00" * 32, spec, ())
    assert reason(signing.check_model_successor, forged_v2, 1, v1_hash) == "bad_parent"
    v5 = GlobalModel(5, 5, b"\x00" * 32, spec, ())  # gateway missed versions 2-4
    assert signing.check_model_successor(v5, 1, v1_hash)
    assert reason(signing.check_model_successor, v5, 1, v1_hash, None, False) == "bad_parent"


def test_credentials_come_in_pairs(tmp_path) -> None:
    from fedcore.protocol.signing import load_credentials

    pem = tmp_path / "signing.key"
    pem.write_text(signing.SigningKey.from_seed(b"\x01" * 32).to_pem())
    with pytest.raises(ConfigError) as err:
        load_credentials("edge.toml", {"signing_key": pem})
    assert "keyring and signing_key go together" in str(err.value) and "edge.toml" in str(err.value)
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ConfigError) as err:
        load_credentials("edge.toml", {"signing_key": bad})
    assert "security.signing_key" in str(err.value)
    assert load_credentials("edge.toml", {}) == (None, None)
