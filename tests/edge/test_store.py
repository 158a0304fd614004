"""The edge sample store: rows and windows, eviction by age and size, kill -9 of a writer."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge.store import SampleStore
from fedcore.samples import Sample, SampleWriter, used_bytes
from fedgate.fieldbus_demo import store_rows


def _rows(n: int, device: str = "d", t0: float = 1000.0, step: float = 1.0) -> list[Sample]:
    out = []
    for i in range(n):
        ts = t0 + i * step
        out += [
            Sample(device, "x", ts, float(i)),
            Sample(device, "y", ts, 10.0 * i),
            Sample(device, "clock", ts, float(5000 + i // 2)),
        ]
    return out


def test_rows_pivot_drops_incomplete_and_keeps_nan(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s.db")
    store.append(_rows(4))
    store.append([Sample("d", "x", 2000.0, 1.0)])  # a row without y: incomplete
    store.append([Sample("d", "x", 3000.0, math.nan), Sample("d", "y", 3000.0, 7.0)])
    rows = store.rows("d", ["y", "x"])
    assert rows.columns == ("y", "x") and rows.values.dtype == np.float32
    np.testing.assert_array_equal(rows.time, [1000.0, 1001.0, 1002.0, 1003.0, 3000.0])
    np.testing.assert_array_equal(rows.values[:4], [[0, 0], [10, 1], [20, 2], [30, 3]])
    assert rows.values[4, 0] == 7.0 and math.isnan(rows.values[4, 1])
    # With the device's own clock: one row per device time, first occurrence wins.
    dev = store.rows("d", ["x"], time_signal="clock")
    np.testing.assert_array_equal(dev.time, [5000, 5001])
    np.testing.assert_array_equal(dev.values[:, 0], [0.0, 2.0])
    assert store.signals("d") == {"x": "", "y": "", "clock": ""} and store.devices() == ["d"]
    assert store.rows("nobody", ["x"]).values.shape == (0, 1)
    store.close()


def test_record_number_keeps_repeated_device_times(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s.db")
    # (bridge ts, record, device clock): record 11 polled twice; records 11 and 12 share a
    # device time (a clock change), which must not merge them.
    polls = [
        (1.0, 10, 600.0),
        (2.0, 11, 1200.0),
        (3.0, 11, 1200.0),
        (4.0, 12, 1200.0),
        (5.0, 13, 1800.0),
    ]
    batch = []
    for ts, seq, clock in polls:
        batch += [
            Sample("d", "seq", ts, float(seq)),
            Sample("d", "clock", ts, clock),
            Sample("d", "x", ts, ts),
        ]
    store.append(batch)
    rows = store.rows("d", ["x"], time_signal="clock", seq_signal="seq")
    assert rows.time.dtype == np.int64
    assert rows.time.tolist() == [600, 1200, 1200, 1800]
    assert rows.values[:, 0].tolist() == [1.0, 2.0, 4.0, 5.0]
    by_clock = store.rows("d", ["x"], time_signal="clock")
    assert by_clock.time.tolist() == [600, 1200, 1800]
    store.close()


def test_eviction_by_age_then_size(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s.db", max_bytes=10**9, max_age_s=100.0)
    store.append(_rows(300, t0=1000.0))
    result = store.evict(now=1000.0 + 100.0 + 49.5)  # cut at ts 1049.5: rows 0..49 go
    assert result.by_age == 50 * 3 and result.by_size == 0
    assert store.rows("d", ["x"]).time[0] == 1050.0
    store.append(_rows(5000, t0=2000.0))
    store.max_bytes, store.max_age_s = 64 * 1024, 1e9
    result = store.evict(now=2000.0)
    assert result.by_size > 0 and used_bytes(store.conn) <= 64 * 1024
    left = store.rows("d", ["x"]).time
    assert left[-1] == 2000.0 + 4999  # the newest survive, the oldest went
    assert len(left) < 5000
    store.close()


WRITER = textwrap.dedent(
    """
    import sys
    from fedcore.samples import Sample, SampleWriter
    w = SampleWriter(sys.argv[1])
    batch = int(sys.argv[2])
    b = 0
    while True:
        w.write([Sample("dev", f"s{i % 7}", b + i / batch, float(b)) for i in range(batch)])
        b += 1
        print(b, flush=True)
    """
)


@pytest.mark.parametrize("kill_after", [3, 40])
def test_kill_9_mid_stream_loses_at_most_the_batch_in_flight(
    tmp_path: Path, kill_after: int
) -> None:
    db = tmp_path / "s.db"
    batch = 500
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), str(batch)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    committed = 0
    while committed < kill_after:
        committed = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    # the writer may have reported more commits than were read before the kill landed
    committed = max([committed, *(int(line) for line in proc.stdout.read().split())])
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    count = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
    batches = conn.execute("SELECT count(DISTINCT value) FROM samples").fetchone()[0]
    conn.close()
    # Every reported commit survived; at most the one being written when killed is extra,
    # and it is whole or absent (never a torn batch).
    assert count % batch == 0
    assert committed <= count // batch <= committed + 1
    assert batches == count // batch
    # The file is still usable by the next writer.
    w = SampleWriter(db)
    assert w.write([Sample("dev", "s0", 1e9, 1.0)]) == 1
    w.close()


def test_store_rows_of_a_simulated_turbine(tmp_path: Path) -> None:
    w = SampleWriter(tmp_path / "s.db")
    cols = [
        "row_time",
        "Ba_avg",
        "P_avg",
        "Ws_avg",
        "Va_avg",
        "Ot_avg",
        "Ya_avg",
        "Wa_avg",
        "row_seq",
    ]
    w.write(
        [
            Sample(
                "t",
                c,
                5.0,
                1388534400.0 if c == "row_time" else 0.0 if c == "row_seq" else float(i),
            )
            for i, c in enumerate(cols)
        ]
    )
    w.close()
    seq, t, v = store_rows(tmp_path / "s.db", "t")
    assert seq.tolist() == [0]
    assert t.dtype == np.int64 and t.tolist() == [1388534400]
    assert v.dtype == np.float32 and v.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
