"""Bounds on a gateway's status before the aggregator acts on it (pure, no I/O).

A status is signed by its gateway, so it is authentic, not true: a compromised gateway can
claim any state or row count. The aggregator uses only ``state``, ``activity`` and
``rows_new`` (readiness and the schedule's new-rows gate), but the whole message is checked,
so that a status the gateway software could never send is a counted, audited rejection
instead of being read as "offline" or as an implausible row count.
"""

from __future__ import annotations

import math

from fedcore.errors import RemoteProtocolError
from fedcore.protocol.messages import Status

STATES = ("online", "offline")
MAX_ROWS = 10**9  # as the sample count bound of an update (aggregator.rounds.MAX_SAMPLES)
MAX_TEXT = 1024  # characters of one string field or map key/value
MAX_ENTRIES = 256  # entries of one map (detail, last_eval, rejected)


def check_status(status: Status) -> None:
    """Raise ``RemoteProtocolError("bad_status")`` unless every field is in bounds."""
    if status.state not in STATES:
        raise RemoteProtocolError("bad_status", f"state {status.state[:40]!r}")
    texts = (status.software, status.lineage, status.activity, status.activity_detail)
    if any(len(t) > MAX_TEXT for t in texts):
        raise RemoteProtocolError("bad_status", f"a text field over {MAX_TEXT} characters")
    for name in ("rows", "rows_new", "rows_needed", "last_rows"):
        value = getattr(status, name)
        if not 0 <= value <= MAX_ROWS:
            raise RemoteProtocolError("bad_status", f"{name} {str(value)[:40]}")
    maps: tuple[dict[str, str] | dict[str, float] | dict[str, int], ...] = (
        status.detail, status.last_eval, status.rejected)
    for m in maps:
        if len(m) > MAX_ENTRIES or any(len(k) > MAX_TEXT for k in m):
            raise RemoteProtocolError("bad_status", f"a map of {len(m)} entries (max {MAX_ENTRIES})")
    if any(len(v) > MAX_TEXT for v in status.detail.values()):
        raise RemoteProtocolError("bad_status", f"a detail value over {MAX_TEXT} characters")
    floats = (status.since, status.epsilon, *status.last_eval.values())
    if not all(math.isfinite(v) for v in floats) or any(v < 0 for v in status.rejected.values()):
        raise RemoteProtocolError("bad_status", "non-finite figures or negative counts")
