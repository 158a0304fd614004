"""Pure parts of the transport interface: URLs, topic matching, sizes, backoff."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedcore.errors import LocalProtocolError
from fedcore.transport.base import (
    Backoff,
    BrokerUrl,
    PublishResult,
    TlsSettings,
    check_topic_filter,
    payload_limit_for,
    publish_packet_size,
    topic_matches,
)


def test_broker_url_parses_schemes_and_default_ports() -> None:
    assert BrokerUrl.parse("mqtt://127.0.0.1:1884") == BrokerUrl("mqtt", "127.0.0.1", 1884)
    assert BrokerUrl.parse("mqtt://broker.local").port == 1883
    url = BrokerUrl.parse("mqtts://broker.local")
    assert url.port == 8883 and url.tls
    assert str(BrokerUrl.parse("mqtt://[::1]:99")) == "mqtt://[::1]:99"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:1", "unknown scheme"),
        ("mqtt://:1883", "missing host"),
        ("mqtt://h:notaport", "Port"),
        ("mqtt://h:1883/path", "unexpected path"),
        ("mqtt://user:pw@h:1883", "credentials"),
        ("broker:1883", "unknown scheme"),
    ],
)
def test_broker_url_errors_name_the_problem(url: str, problem: str) -> None:
    with pytest.raises(LocalProtocolError, match=problem) as info:
        BrokerUrl.parse(url)
    assert url in str(info.value)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("+/+/update/+", "fg/f/update/d1", True),
        ("a/+/c", "a/b/d", False),
        ("#", "$SYS/broker", False),
        ("a/b", "a/b/c", False),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", ""])
def test_bad_filters_are_refused(bad: str) -> None:
    with pytest.raises(LocalProtocolError):
        check_topic_filter(bad)


def test_publish_packet_size_counts_headers() -> None:
    # 1 fixed + 1 varint + 2 topic length + 3 topic + 2 packet id + 1 props + 10 payload
    assert publish_packet_size("a/b", 10, qos=1) == 20
    assert publish_packet_size("a/b", 10, qos=0) == 18
    # Remaining length of 200 needs a two-byte varint.
    assert publish_packet_size("a/b", 192, qos=1) == 1 + 2 + 200


def test_payload_limit_fits_exactly_in_the_broker_packet_size() -> None:
    for max_packet in (100, 130, 131, 132, 20000):
        limit = payload_limit_for("t/x", 1, 10**9, max_packet)
        assert publish_packet_size("t/x", limit, 1) <= max_packet
        assert publish_packet_size("t/x", limit + 1, 1) > max_packet
    assert payload_limit_for("t/x", 1, 5000, None) == 5000
    assert payload_limit_for("t/x", 1, 50, 20000) == 50


def test_backoff_grows_caps_and_jitters() -> None:
    backoff = Backoff(0.5, 8.0)
    rng = random.Random(3)
    delays = [[backoff.delay(n, rng) for n in range(8)] for _ in range(50)]
    for row in delays:
        for n, d in enumerate(row):
            cap = min(8.0, 0.5 * 2**n)
            assert cap / 2 <= d <= cap
    # Jitter: clients with different draws do not reconnect at the same instant.
    assert len({round(row[5], 6) for row in delays}) == 50
    with pytest.raises(LocalProtocolError):
        Backoff(0, 1)


def test_publish_result_denied_and_tls_pairing() -> None:
    assert PublishResult(1, 135).denied and PublishResult(1, 135).reason == "not authorized"
    assert not PublishResult(1, 0).denied and not PublishResult(1, None).denied
    with pytest.raises(LocalProtocolError):
        TlsSettings(cert_file=None, key_file=Path("k.pem"))
