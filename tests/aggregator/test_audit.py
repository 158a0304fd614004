"""The hash-chained audit log: appends, resumes, and every kind of tampering is found."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from aggregator.audit import GENESIS, AuditLog, AuditLogError, verify_chain


def write_sample(path: Path) -> list[dict[str, object]]:
    with AuditLog(path) as log:
        return [
            log.append("join", 1.0, device="gw-1"),
            log.append("join", 2.0, device="gw-2"),
            log.append("rejection", 3.0, who="gw-2", reason="bad_signature", detail="key 7"),
            log.append("quarantine", 4.0, device="gw-2", round=3, score=9.5),
            log.append("model_commit", 5.0, version=1, model_hash="ab" * 32),
        ]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_entries_chain_and_hash_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    written = write_sample(path)
    prev = GENESIS
    for i, raw in enumerate(lines(path), start=1):
        entry = json.loads(raw)
        assert entry["seq"] == i and entry["prev_hash"] == prev
        body = {k: v for k, v in entry.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert entry["hash"] == hashlib.sha256(canonical.encode()).hexdigest()
        prev = entry["hash"]
    assert json.loads(lines(path)[2])["reason"] == "bad_signature"
    result = verify_chain(path)
    assert result.ok and result.entries == 5 and result.head == written[-1]["hash"]


def test_log_resumes_the_chain_after_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    with AuditLog(path) as log:
        assert log.seq == 5
        entry = log.append("release", 6.0, device="gw-2")
    assert entry["seq"] == 6
    assert entry["prev_hash"] == json.loads(lines(path)[4])["hash"]
    assert verify_chain(path).ok and verify_chain(path).entries == 6


def test_new_log_is_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).close()
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0
    assert verify_chain(path).ok and verify_chain(path).entries == 0


def rewrite(path: Path, new_lines: list[bytes]) -> None:
    path.write_bytes(b"".join(new_lines))


def rehash(raw: bytes, **changes: object) -> bytes:
    entry = json.loads(raw)
    entry.update(changes)
    body = {k: v for k, v in entry.items() if k != "hash"}
    entry["hash"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return json.dumps(entry).encode() + b"\n"


def test_an_edited_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    content = lines(path)
    content[2] = content[2].replace(b"bad_signature", b"timeout")
    rewrite(path, content)
    result = verify_chain(path)
    assert (result.ok, result.first_bad_line, result.entries) == (False, 3, 2)
    assert "edited" in result.problem


def test_an_edited_and_rehashed_entry_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    content = lines(path)
    content[2] = rehash(content[2], reason="timeout")
    rewrite(path, content)
    result = verify_chain(path)
    assert (result.ok, result.first_bad_line) == (False, 4)
    assert "prev_hash" in result.problem


def test_a_deleted_entry_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    content = lines(path)
    del content[1]
    rewrite(path, content)
    result = verify_chain(path)
    assert (result.ok, result.first_bad_line) == (False, 2)


def test_reordered_entries_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    content = lines(path)
    content[3], content[4] = content[4], content[3]
    rewrite(path, content)
    result = verify_chain(path)
    assert (result.ok, result.first_bad_line) == (False, 4)


def test_a_renumbered_entry_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    content = lines(path)
    # a forged line 2 that links right and hashes right but skips a number
    first = json.loads(content[0])
    content[1] = rehash(content[1], seq=7, prev_hash=first["hash"])
    rewrite(path, content[:2])
    result = verify_chain(path)
    assert (result.ok, result.first_bad_line) == (False, 2)
    assert "seq" in result.problem


def test_a_cut_end_is_found_only_against_a_recorded_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    head = write_sample(path)[-1]["hash"]
    rewrite(path, lines(path)[:3])
    assert verify_chain(path).ok
    result = verify_chain(path, expected_head=str(head))
    assert not result.ok and "head hash" in result.problem and result.entries == 3


def test_a_torn_last_line_is_reported_and_stops_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    content = lines(path)
    content[4] = content[4][:-10]
    rewrite(path, content)
    result = verify_chain(path)
    assert (result.ok, result.first_bad_line) == (False, 5)
    with pytest.raises(AuditLogError) as info:
        AuditLog(path)
    assert info.value.exit_code == 78
    assert "line 5" in str(info.value) and "torn" in str(info.value)
    assert lines(path) == content  # refusing did not touch the file


def test_a_complete_entry_missing_its_newline_is_not_continued(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(AuditLogError, match="torn"):
        AuditLog(path)


def test_a_tampered_last_entry_stops_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    content = lines(path)
    content[4] = content[4].replace(b'"version":1', b'"version":2')
    rewrite(path, content)
    with pytest.raises(AuditLogError, match="edited"):
        AuditLog(path)


def test_garbage_and_blank_lines_are_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    content = lines(path)
    for bad in (b"not json\n", b"\n", b"[1, 2]\n", b'{"seq": 1}\n'):
        rewrite(path, [*content[:2], bad, *content[2:]])
        result = verify_chain(path)
        assert (result.ok, result.first_bad_line) == (False, 3), bad


@pytest.mark.parametrize(
    ("kind", "fields", "words"),
    [
        ("Join", {}, "lower-case"),
        ("join", {"hash": "x"}, "reserved"),
        ("join", {"seq": 1}, "reserved"),
        ("rejection", {"who": "gw"}, "reason"),
        ("join", {"score": float("nan")}, "JSON"),
        ("join", {"blob": object()}, "JSON"),
    ],
)
def test_bad_appends_are_refused_and_write_nothing(
    tmp_path: Path, kind: str, fields: dict[str, object], words: str
) -> None:
    path = tmp_path / "audit.jsonl"
    write_sample(path)
    before = path.read_bytes()
    with AuditLog(path) as log, pytest.raises(ValueError, match=words):
        log.append(kind, 9.0, **fields)
    assert path.read_bytes() == before
    assert verify_chain(path).ok


def test_a_flood_of_rejections_costs_a_bounded_number_of_lines_per_round(tmp_path: Path) -> None:
    from aggregator.security import MAX_REJECTION_LINES, AggregatorSecurity

    path = tmp_path / "audit.jsonl"
    security = AggregatorSecurity(audit=AuditLog(path))
    for i in range(MAX_REJECTION_LINES + 100):
        security.audit_rejection("mallory", "bad_samples" if i % 2 else "bad_stats", "x" * 500, 1.0)
    security.audit_rejection("gw1", "late", "", 1.0)  # another sender has its own lines
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == MAX_REJECTION_LINES + 1
    security.on_round(7, 2.0)  # the rest are written, counted, at the next announcement
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    last = lines[-1]
    assert last["kind"] == "rejections_suppressed" and last["who"] == "mallory"
    assert last["reasons"] == {"bad_samples": 50, "bad_stats": 50} and last["before_round"] == 7
    assert all(len(line) < 1000 for line in path.read_text().splitlines())
    security.audit_rejection("mallory", "late", "", 3.0)  # a new round: lines again
    assert json.loads(path.read_text().splitlines()[-1])["kind"] == "rejection"
    assert verify_chain(path).ok
