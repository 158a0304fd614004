"""Preflight of a service's own resources: a gateway's sample store, the metrics port, the
aggregator's saved state.

Part of ``fedgate config check FILE`` (offline and ``--live``). For edge configs with
``data.source = "store"``: does the store give the rows the task names? A store the bridge has not written yet, or one with fewer
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


def check_metrics_port(subject: Subject) -> list[Finding]:
    """The Prometheus port can be listened on (the service exits 78 when it cannot)."""
    import socket

    port, addr = subject.config.metrics_port, subject.config.metrics_addr
    if not port:
        return []
    try:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as s:
            s.bind((addr, port))
    except OSError as exc:
        return [subject.problem("metrics", "state.metrics_port", port,
                                f"cannot listen on {addr}:{port}: {exc.strerror or exc}", 78)]
    return [Finding("metrics", f"{addr}:{port} is free")]


def check_saved_state(subject: Subject) -> list[Finding]:
    """The aggregator's saved state can be resumed with the configured [model]."""
    if subject.kind != "aggregator":
        return []
    import random

    from aggregator import checkpoint as checkpoints
    from aggregator import rounds as sm
    from fedcore.learning.models import init_params

    config = subject.config
    try:
        saved = checkpoints.load(config.state_dir)
    except checkpoints.DamagedCheckpoint as exc:
        return [subject.problem("saved state", "state.dir", str(config.state_dir),
                                f"cannot be read ({exc}); `fedgate aggregator new-lineage` sets it aside", 78)]
    if saved is None:
        return [Finding("saved state", f"none in {config.state_dir}: the first start opens a new lineage")]
    import numpy as np

    machine = sm.RoundStateMachine(config.rounds, config.spec,
                                   init_params(config.spec, np.random.default_rng(0)), random.Random(0))
    try:
        machine.restore(saved)
    except sm.IncompatibleState as exc:
        key = f"model.{exc.key}" if exc.key else "model"
        return [subject.problem("saved state", key, exc.value, f"{exc}; start a new lineage with "
                                f"`fedgate aggregator new-lineage -c {subject.file}`", 78)]
    return [Finding("saved state", f"lineage {machine.lineage}, round {machine.round}, model "
                    f"version {machine.version}: resumes")]


EDGE_DATA_CHECKS = [check_store]
SERVICE_CHECKS = [check_metrics_port, check_saved_state]
