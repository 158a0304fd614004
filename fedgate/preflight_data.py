"""Preflight of a gateway's own data: does its sample store give the rows its task names?

Part of ``fedgate config check FILE`` (offline and ``--live``) for edge configs with
``data.source = "store"``. A store the bridge has not written yet, or one with fewer
training rows than ``min_rows``, is not a problem: ``fedgate edge run`` waits and says so in
its status. A task that names a signal the bridge's device does not record is one: the
gateway would wait forever (exit 78, as a configuration error).
"""

from __future__ import annotations

import math
from typing import Any

from fedgate.preflight_findings import Finding, Subject

CHECK = "store"


def check_store(subject: Subject) -> list[Finding]:
    from edge.data import StoreSource
    from edge.store import StoreNotReady, StoreReader
    from fedcore import samples

    data = subject.config.data
    if data.source != "store":
        return []
    rows = data.rows
    if not data.store.exists():
        return [Finding(CHECK, f"{data.store} does not exist yet; the gateway waits for the bridge",
                        skipped=True)]
    if not data.store.is_file():
        return []  # the file check has said what is wrong with it
    try:
        conn = samples.connect(data.store, readonly=True)
    except samples.StoreUnavailable as exc:
        return [Finding(CHECK, f"{exc}; the gateway waits until it can read it", skipped=True)]
    except OSError:
        return []  # unreadable: the file check has said so
    try:
        recorded = {str(n) for (n,) in conn.execute("SELECT name FROM signals WHERE device = ?",
                                                    (data.device,))}
    finally:
        conn.close()
    if not recorded:
        return [Finding(CHECK, f"no readings of device {data.device!r} in {data.store} yet; the "
                        "gateway waits for the bridge", skipped=True)]
    missing = [s for s in rows.signals if s not in recorded]
    if missing:
        return [subject.problem(CHECK, _key_naming(rows, missing[0]), missing[0],
                                f"device {data.device!r} records no signal {missing[0]!r} (it records: "
                                f"{', '.join(sorted(recorded))}); the gateway would wait forever", 78)]
    source = StoreSource(rows, StoreReader(data.store, data.device, rows.signals, since_s=rows.window_s))
    try:
        snap = source.snapshot(-math.inf)
    except StoreNotReady as exc:
        return [Finding(CHECK, f"{exc}; the gateway waits", skipped=True)]
    summary = (f"{len(snap.x_train)} training and {len(snap.x_holdout)} holdout rows of "
               f"{data.device!r} from {snap.rows} rows in the window")
    if not snap.ready:
        return [Finding(CHECK, f"{summary}: waiting for data ({snap.waiting})", skipped=True)]
    return [Finding(CHECK, f"{summary}; every signal of the task is recorded")]


def _key_naming(rows: Any, signal: str) -> str:
    """The [data] key that names ``signal``, for the error message."""
    if signal in (f.signal for f in rows.features):
        return "data.features"
    for key in ("target", "time_signal", "record_signal"):
        if getattr(rows, key) == signal:
            return f"data.{key}"
    if signal in (s for s, _, _ in rows.valid):
        return f"data.valid.{signal}"
    return "data.exclude_when"


EDGE_DATA_CHECKS = [check_store]
