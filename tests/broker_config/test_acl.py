"""The generated ACL and the topic module agree (ACL semantics emulated as Mosquitto applies them).

The real broker enforcing the same file is tested in tests/broker/test_security.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker_config.acl import generate_acl
from broker_config.render import FleetLayout, render_mosquitto_conf_text
from fedcore.errors import LocalProtocolError
from fedcore.protocol.topics import ACL_RULES, SECAGG_STAGES, AclRule, TopicKind, Topics


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
    """Mosquitto 2.0's reading of an acl_file (src/security_default.c): ``topic`` lines
    before any ``user`` line bind anonymous clients only; ``user`` sections bind that user;
    ``pattern`` lines bind every client, with %u replaced by its username. ``deny`` lines go
    to the front of their list. A check walks the client's own list, then the patterns, and
    stops at the first line whose topic matches and that denies or grants this access."""

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
            assert access in ("read", "write", "readwrite", "deny"), line
            if word == "pattern":
                self._add(self.patterns, access, topic)
            elif word == "topic":
                self._add(self.general if user is None else self.users[user], access, topic)
            else:
                raise AssertionError(f"unexpected ACL line {line!r}")

    @staticmethod
    def _add(entries: list[tuple[str, str]], access: str, topic: str) -> None:
        if access == "deny":
            entries.insert(0, (access, topic))
        else:
            entries.append((access, topic))

    @staticmethod
    def _decide(entries: list[tuple[str, str]], access: str, topic: str) -> bool | None:
        for granted, filter_ in entries:
            if topic_matches(filter_, topic):
                if granted == "deny":
                    return False
                if granted in (access, "readwrite"):
                    return True
        return None

    def allowed(self, username: str | None, access: str, topic: str) -> bool:
        own = self.general if username is None else self.users.get(username, [])
        decided = self._decide(own, access, topic)
        if decided is not None:
            return decided
        if username is None:  # patterns using %u skip clients without a username
            patterns = [(a, t) for a, t in self.patterns if "%u" not in t]
        else:
            patterns = [(a, t.replace("%u", username)) for a, t in self.patterns]
        return bool(self._decide(patterns, access, topic))


CHUNK = bytes(range(32))  # a chunk's SHA-256 names its topic


def concrete(kind: TopicKind, topics: Topics, device: str) -> str:
    return {
        TopicKind.ROUND: topics.round(),
        TopicKind.MODEL: topics.model(),
        TopicKind.MODEL_CHUNK: topics.model_chunk(CHUNK),
        TopicKind.DEPLOYMENT: topics.deployment(),
        TopicKind.DEPLOYED: topics.deployed(),
        TopicKind.STATE: topics.state(),
        TopicKind.UPDATE: topics.update(device),
        TopicKind.UPDATE_CHUNK: topics.update_chunk(device),
        TopicKind.SECAGG: topics.secagg("keys", device),
        TopicKind.METRICS: topics.metrics(),
        TopicKind.STATUS: topics.status(device),
        TopicKind.TELEMETRY: topics.telemetry(device),
    }[kind]


def test_emulation_follows_mosquitto_deny_order() -> None:
    acl = Acl("user u\ntopic read a/+\ntopic deny a/x\npattern readwrite p/%u\npattern deny p/u\n")
    assert acl.users["u"][0] == ("deny", "a/x")  # deny lines go first, wherever they stand
    assert acl.allowed("u", "read", "a/y") and not acl.allowed("u", "read", "a/x")
    assert not acl.allowed("u", "write", "a/y")
    assert not acl.allowed("u", "read", "p/u")  # the pattern deny wins over the grant
    assert acl.allowed("v", "write", "p/v")


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
        built = rule.pattern.format(fleet="plant", task="task", device="gw1", stage="keys", chunk=CHUNK.hex())
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


OPERATORS = ("ops-status", "dashboard")


@pytest.mark.parametrize("rule", ACL_RULES, ids=[r.kind.value for r in ACL_RULES])
@pytest.mark.parametrize("fleet", ["+", "plant"])
def test_operators_read_exactly_what_operator_read_grants_and_write_nothing(rule: AclRule, fleet: str) -> None:
    acl = Acl(generate_acl(fleet, operators=OPERATORS))
    topics = Topics("plant", "task")
    for operator in OPERATORS:
        for device in ("gw1", "gw2", "aggregator", *OPERATORS):
            topic = concrete(rule.kind, topics, device)
            assert not acl.allowed(operator, "write", topic), (operator, topic)
            # The per-device topics that carry the operator's own name belong to nobody
            # and are closed to it; every other device's topic reads as the rule says.
            own_name = "{device}" in rule.pattern and device == operator
            expected = rule.operator_read and not own_name
            assert acl.allowed(operator, "read", topic) == expected, (operator, topic)
    # Operators change nothing for anyone else.
    without = Acl(generate_acl(fleet))
    own = concrete(rule.kind, topics, "gw1")
    for user in ("gw1", "aggregator"):
        for access in ("read", "write"):
            assert acl.allowed(user, access, own) == without.allowed(user, access, own)


def test_operator_acl_block_and_names() -> None:
    text = generate_acl("plant", operators=["ops", "ops"])
    acl = Acl(text)
    assert text.count("user ops\n") == 1
    grants = [t for a, t in acl.users["ops"] if a != "deny"]
    assert {a for a, _ in acl.users["ops"]} == {"deny", "read"}
    assert len(grants) == sum(r.operator_read for r in ACL_RULES)
    assert "topic read fg/plant/status/+" in text.splitlines()
    assert not acl.allowed("ops", "read", Topics("other", "task").state())  # other fleets closed
    for bad in ("..", ".hidden", "a/b", "#"):
        with pytest.raises(LocalProtocolError):
            generate_acl("plant", operators=[bad])
    with pytest.raises(LocalProtocolError):
        generate_acl("plant", aggregator="agg", operators=["agg"])


def test_fleet_restriction_and_line_count() -> None:
    acl_text = generate_acl("plant", aggregator="agg-1")
    acl = Acl(acl_text)
    other_fleet = Topics("other", "task")
    assert not acl.allowed("gw1", "write", other_fleet.update("gw1"))
    assert not acl.allowed("agg-1", "write", other_fleet.model())
    assert acl.allowed("agg-1", "write", Topics("plant", "task").model())
    assert not acl.allowed("aggregator", "write", Topics("plant", "task").model())
    # No line is written for anonymous clients, and none could write anything. (Shared
    # patterns without %u would reach them: the listener refuses them at CONNECT.)
    assert not acl.general
    assert not any(acl.allowed(None, "write", concrete(r.kind, Topics("plant", "task"), "gw1")) for r in ACL_RULES)
    grants = sum(
        (r.device_read or r.device_write) + (r.aggregator_read or r.aggregator_write) for r in ACL_RULES
    )
    # the secagg rule is a read line and a write line per stage, for devices and aggregator
    assert len(acl.patterns) + len(acl.users["agg-1"]) == grants + 2 * len(SECAGG_STAGES)


def test_declared_tasks_bound_what_anyone_can_write() -> None:
    acl = Acl(generate_acl("plant", tasks=["wind", "pumps"]))
    for task in ("wind", "pumps"):
        topics = Topics("plant", task)
        assert acl.allowed("gw1", "write", topics.update("gw1"))
        assert acl.allowed("gw1", "write", topics.secagg("masked", "gw1"))
        assert acl.allowed("aggregator", "write", topics.model())
    # a task nobody declared: no retained growth under its name, by a device or anyone
    made_up = Topics("plant", "junk1")
    for rule in ACL_RULES:
        topic = concrete(rule.kind, made_up, "gw1")
        if "{task}" in rule.pattern:
            assert not acl.allowed("gw1", "write", topic), topic
            assert not acl.allowed("aggregator", "write", topic), topic
        # reading grows nothing and stays as the rule says
        assert acl.allowed("aggregator", "read", topic) == rule.aggregator_read
    # stage names outside the protocol's are not even topics, and not granted
    assert not acl.allowed("gw1", "write", "fg/plant/wind/secagg/junk/gw1")
    with pytest.raises(LocalProtocolError):
        Topics("plant", "wind").secagg("junk", "gw1")
    with pytest.raises(LocalProtocolError):
        generate_acl("plant", tasks=["../x"])
    # a task named like a fleet-level branch would put its model on a device's status topic
    for reserved in ("status", "telemetry"):
        with pytest.raises(LocalProtocolError, match="branch of the topic tree"):
            Topics("plant", reserved)
        with pytest.raises(LocalProtocolError):
            generate_acl("plant", tasks=[reserved])


def test_conf_requires_client_certificates(tmp_path: Path) -> None:
    text = render_mosquitto_conf_text(FleetLayout(tmp_path), 18884, run_as_user="root")
    lines = set(text.splitlines())
    for expected in (
        "listener 18884 127.0.0.1", "require_certificate true", "use_identity_as_username true",
        "allow_anonymous false", "protocol mqtt", "persistence true", "user root",
        "set_tcp_nodelay true",
        f"acl_file {(tmp_path / 'broker' / 'acl').resolve()}",
        f"crlfile {(tmp_path / 'broker' / 'crl.pem').resolve()}",
    ):
        assert expected in lines, expected
    assert any(line.startswith("max_queued_messages ") for line in lines)
    assert any(line.startswith("max_packet_size ") for line in lines)
    assert "$" not in text  # every template placeholder was filled
    assert "user mosquitto" in render_mosquitto_conf_text(FleetLayout(tmp_path), 18884).splitlines()
    for bad in ({"host": "127.0.0.1\nallow_anonymous true"}, {"run_as_user": "root\nuser x"}):
        with pytest.raises(ValueError):
            render_mosquitto_conf_text(FleetLayout(tmp_path), 18884, **bad)  # type: ignore[arg-type]
