"""The generated ACL and the topic module agree (ACL semantics emulated as Mosquitto applies them).

The real broker enforcing the same file is tested in tests/broker/test_security.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_config.acl import generate_acl
from broker_config.render import FleetLayout, render_mosquitto_conf_text
from fedcore.protocol.topics import ACL_RULES, AclRule, TopicKind, Topics


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT topic-filter matching: ``+`` one level, ``#`` the rest (incl. the parent level)."""
    f_parts, t_parts = filter_.split("/"), topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


class Acl:
    """Mosquitto's reading of an acl_file: ``topic`` lines before any ``user`` line bind
    anonymous clients only; ``user`` sections bind that user; ``pattern`` lines bind every
    client, with %u replaced by its username."""

    def __init__(self, text: str) -> None:
        self.general: list[tuple[str, str]] = []
        self.users: dict[str, list[tuple[str, str]]] = {}
        self.patterns: list[tuple[str, str]] = []
        user: str | None = None
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, rest = line.split(" ", 1)
            if word == "user":
                user = rest
                self.users.setdefault(user, [])
                continue
            access, topic = rest.split(" ", 1)
            assert access in ("read", "write", "readwrite"), line
            if word == "pattern":
                self.patterns.append((access, topic))
            elif word == "topic":
                (self.general if user is None else self.users[user]).append((access, topic))
            else:
                raise AssertionError(f"unexpected ACL line {line!r}")

    def allowed(self, username: str | None, access: str, topic: str) -> bool:
        if username is None:
            grants = list(self.general)
            return any(a in (access, "readwrite") and topic_matches(t, topic) for a, t in grants)
        grants = list(self.users.get(username, []))
        grants += [(a, t.replace("%u", username)) for a, t in self.patterns]
        return any(a in (access, "readwrite") and topic_matches(t, topic) for a, t in grants)


def concrete(kind: TopicKind, topics: Topics, device: str) -> str:
    return {
        TopicKind.ROUND: topics.round(),
        TopicKind.MODEL: topics.model(),
        TopicKind.DEPLOYMENT: topics.deployment(),
        TopicKind.DEPLOYED: topics.deployed(),
        TopicKind.STATE: topics.state(),
        TopicKind.UPDATE: topics.update(device),
        TopicKind.SECAGG: topics.secagg("keys", device),
        TopicKind.METRICS: topics.metrics(),
        TopicKind.STATUS: topics.status(device),
        TopicKind.TELEMETRY: topics.telemetry(device),
    }[kind]


def test_matcher() -> None:
    assert topic_matches("fg/+/t/update/+", "fg/f/t/update/gw1")
    assert not topic_matches("fg/+/t/update/+", "fg/f/t/update/gw1/x")
    assert not topic_matches("fg/+/t/update/+", "fg/f/t/update")
    assert topic_matches("fg/#", "fg/a/b") and topic_matches("fg/#", "fg")
    assert not topic_matches("fg/a", "fg/b")


def test_rule_patterns_are_the_topics_module_own_topics() -> None:
    topics = Topics("plant", "task")
    assert {r.kind for r in ACL_RULES} == set(TopicKind)
    for rule in ACL_RULES:
        built = rule.pattern.format(fleet="plant", task="task", device="gw1", stage="keys")
        assert built == concrete(rule.kind, topics, "gw1")


@pytest.mark.parametrize("rule", ACL_RULES, ids=[r.kind.value for r in ACL_RULES])
@pytest.mark.parametrize("fleet", ["+", "plant"])
def test_every_permission_bit_maps_to_the_acl(rule: AclRule, fleet: str) -> None:
    acl = Acl(generate_acl(fleet))
    topics = Topics("plant", "task")
    own = concrete(rule.kind, topics, "gw1")
    assert acl.allowed("gw1", "write", own) == rule.device_write
    assert acl.allowed("gw1", "read", own) == rule.device_read
    assert acl.allowed("aggregator", "write", own) == rule.aggregator_write
    assert acl.allowed("aggregator", "read", own) == rule.aggregator_read
    # Another device's subtree is closed to gw1, whatever the rule grants gw2 there.
    if "{device}" in rule.pattern:
        other = concrete(rule.kind, topics, "gw2")
        assert not acl.allowed("gw1", "write", other)
        assert not acl.allowed("gw1", "read", other)


def test_fleet_restriction_and_line_count() -> None:
    acl_text = generate_acl("plant", aggregator="agg-1")
    acl = Acl(acl_text)
    other_fleet = Topics("other", "task")
    assert not acl.allowed("gw1", "write", other_fleet.update("gw1"))
    assert not acl.allowed("agg-1", "write", other_fleet.model())
    assert acl.allowed("agg-1", "write", Topics("plant", "task").model())
    assert not acl.allowed("aggregator", "write", Topics("plant", "task").model())
    assert not acl.allowed(None, "read", Topics("plant", "task").model())  # no anonymous grants
    assert not acl.general
    grants = sum(
        (r.device_read or r.device_write) + (r.aggregator_read or r.aggregator_write) for r in ACL_RULES
    )
    assert len(acl.patterns) + len(acl.users["agg-1"]) == grants


def test_conf_requires_client_certificates(tmp_path: Path) -> None:
    text = render_mosquitto_conf_text(FleetLayout(tmp_path), 18884, run_as_user="root")
    lines = set(text.splitlines())
    for expected in (
        "listener 18884 127.0.0.1", "require_certificate true", "use_identity_as_username true",
        "allow_anonymous false", "protocol mqtt", "persistence true", "user root",
        f"acl_file {(tmp_path / 'broker' / 'acl').resolve()}",
        f"crlfile {(tmp_path / 'broker' / 'crl.pem').resolve()}",
    ):
        assert expected in lines, expected
    assert any(line.startswith("max_queued_messages ") for line in lines)
    assert any(line.startswith("max_packet_size ") for line in lines)
    assert "$" not in text  # every template placeholder was filled
