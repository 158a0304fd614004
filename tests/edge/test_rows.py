"""Pure tests of the gateway's task definition (edge.rows): from raw rows to training rows.

The window is fed as the store reader feeds it, chunk by chunk; most properties are checked
for every way of cutting the same raw rows into chunks, since the chunking depends only on
when the runtime happens to read the store.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import rows as rowlib
from edge.rows import Condition, Feature, RawRows, RowSpec, RowWindow

PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def spec(features: tuple[str, ...] = ("a",), target: str = "y", **kw: object) -> RowSpec:
    task = kw.pop("task", "regression" if target else "anomaly")
    kw.setdefault("holdout_every", 0)
    return RowSpec(task=str(task), features=tuple(rowlib.parse_feature(f) for f in features),
                   target=target, **kw)  # type: ignore[arg-type]


def raw(s: RowSpec, time: object, **signals: object) -> RawRows:
    """Raw rows by signal name; a signal not given is missing (NaN) everywhere."""
    t = np.asarray(time, np.float64)
    values = np.full((len(t), len(s.signals)), np.nan)
    for name, column in signals.items():
        values[:, s.signals.index(name)] = np.asarray(column, np.float64)
    return RawRows(t, values)


def pieces(r: RawRows, cuts: list[int]) -> list[RawRows]:
    """``r`` cut into chunks at the given row positions."""
    edges = [0, *sorted({c for c in cuts if 0 < c < len(r)}), len(r)]
    return [RawRows(r.time[a:b], r.values[a:b]) for a, b in zip(edges, edges[1:], strict=False)]


def fed(s: RowSpec, chunks: list[RawRows]) -> RowWindow:
    window = RowWindow(s)
    for chunk in chunks:
        window.add(chunk)
    return window


def column(s: RowSpec, window: RowWindow, name: str) -> np.ndarray:
    return window.values[:, s.columns.index(name)]


cuts = st.lists(st.integers(min_value=1, max_value=200), max_size=12)


# ---- features and exclusions ------------------------------------------------------------


def test_features_are_signal_names_or_sine_and_cosine_of_degrees() -> None:
    assert rowlib.parse_feature("Ws_avg") == Feature("Ws_avg", "Ws_avg", "")
    assert rowlib.parse_feature("sin(Wa_avg)") == Feature("sin(Wa_avg)", "Wa_avg", "sin")
    assert rowlib.parse_feature("cos( Wa_avg )").signal == "Wa_avg"
    s = spec(("sin(Wa_avg)", "cos(Wa_avg)", "Ws_avg"))
    assert s.columns == ("Wa_avg", "Ws_avg", "y")  # one column per signal, however often used
    values = np.array([[90.0, 3.0, 0.0], [180.0, 4.0, 0.0], [359.0, 5.0, 0.0], [1.0, 6.0, 0.0]])
    x = rowlib.feature_matrix(s, values)
    np.testing.assert_allclose(x[:2], [[1.0, 0.0, 3.0], [0.0, -1.0, 4.0]], atol=1e-12)
    # a direction is circular: 359 and 1 degrees are neighbours
    assert np.linalg.norm(x[2, :2] - x[3, :2]) < 0.04


@pytest.mark.parametrize("text", ["", "  ", "tan(x)", "sin(x", "sin()", "sin(cos(x))", "a b",
                                  "x" * 65, "sin x", "x;y", 5, None])
def test_a_feature_that_is_no_signal_or_angle_function_is_refused(text: object) -> None:
    with pytest.raises(ValueError, match="sin\\(SIGNAL\\)"):
        rowlib.parse_feature(text)  # type: ignore[arg-type]


def test_exclusions_are_conditions_joined_by_and() -> None:
    assert rowlib.parse_exclusion("P_avg <= 0 and Ws_avg > 4") == (
        Condition("P_avg", "<=", 0.0), Condition("Ws_avg", ">", 4.0))
    assert rowlib.parse_exclusion("x<-1.5e3") == (Condition("x", "<", -1500.0),)
    ops = [c.op for c in rowlib.parse_exclusion("a < 1 and b <= 1 and c > 1 and d >= 1 and "
                                                "e == 1 and f != 1")]
    assert ops == ["<", "<=", ">", ">=", "==", "!="]


@pytest.mark.parametrize("text", ["", "P_avg", "P_avg <=", "<= 0", "P_avg => 0", "P_avg = 0",
                                  "P_avg <= zero", "P_avg <= 0 or Ws_avg > 4", "P_avg <= 0 and",
                                  "and P_avg <= 0", "P_avg <= 0 and and Ws_avg > 4",
                                  "P_avg <= 1.2.3", None])
def test_an_exclusion_that_is_no_condition_is_refused(text: object) -> None:
    with pytest.raises(ValueError):
        rowlib.parse_exclusion(text)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [
    {"task": "forecast"}, {"aggregate": "median"}, {"features": ()},
    {"task": "anomaly"},  # with a target
    {"task": "regression", "target": ""}, {"task": "classification", "target": ""},
])
def test_a_row_spec_that_cannot_be_a_task_is_refused(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"task": "regression", "features": (Feature("a", "a"),), "target": "y"}
    args.update(kw)
    with pytest.raises(ValueError):
        RowSpec(**args)  # type: ignore[arg-type]


# ---- records and device time --------------------------------------------------------------


@st.composite
def polls(draw: st.DrawFn) -> tuple[list[float], list[int]]:
    """Record numbers as a bridge polling faster than the device sees them: each record read
    one or more times, the counter sometimes restarting (a device reboot, a wrap), and now
    and then a reading without a record number. Returns (record per poll, expected rows as
    poll positions: the first reading of each record)."""
    records: list[float] = []
    first: list[int] = []
    number, previous = draw(st.integers(0, 5)), -1
    for _ in range(draw(st.integers(1, 25))):
        if draw(st.integers(0, 5)) == 0:
            number = draw(st.integers(0, 2))  # restarts, never to the number it holds
            if number == previous:
                number += 3
        for reading in range(draw(st.integers(1, 4))):
            if draw(st.integers(0, 6)) == 0:
                records.append(math.nan)
            if reading == 0:
                first.append(len(records))
            records.append(float(number))
        previous, number = number, number + 1
    return records, first


@PROPERTY
@given(polls(), cuts)
def test_one_row_per_record_in_record_order_however_the_reads_are_chunked(
        case: tuple[list[float], list[int]], where: list[int]) -> None:
    records, first = case
    s = spec(record_signal="rec", window_rows=10_000)
    n = len(records)
    r = raw(s, np.arange(n) + 1000.0, a=np.arange(n), y=np.arange(n) * 2.0, rec=records)
    window = fed(s, pieces(r, where))
    np.testing.assert_array_equal(column(s, window, "a"), first)  # the first reading of each
    np.testing.assert_array_equal(window.time, np.asarray(first) + 1000.0)
    assert window.late == 0


def test_a_reading_without_a_record_number_does_not_make_the_record_new() -> None:
    s = spec(record_signal="rec")
    r = raw(s, [1, 2, 3, 4], a=[10, 11, 12, 13], y=[0, 0, 0, 0], rec=[5, math.nan, 5, 6])
    assert fed(s, [r]).values[:, 0].tolist() == [10, 13]
    assert fed(s, pieces(r, [2])).values[:, 0].tolist() == [10, 13]


def test_records_keep_device_order_when_the_device_clock_steps_back() -> None:
    # a logger's clock set back an hour (daylight saving) after record 3: its records keep
    # their order and none is taken for a late or repeated one
    s = spec(time_signal="clock", record_signal="rec")
    clock = [3600, 4200, 4800, 1800, 1800, 2400, 3000]
    rec = [1, 2, 3, 4, 4, 5, 6]
    r = raw(s, np.arange(7) + 1e6, a=rec, y=rec, rec=rec, clock=clock)
    for chunks in ([r], pieces(r, [3]), pieces(r, [1, 2, 3, 4, 5, 6])):
        window = fed(s, chunks)
        assert window.time.tolist() == [3600, 4200, 4800, 1800, 2400, 3000]
        assert column(s, window, "a").tolist() == [1, 2, 3, 4, 5, 6]
        assert window.late == 0


def test_without_a_record_number_a_repeated_device_time_is_one_row_however_chunked() -> None:
    # a 10-minute device clock polled every few seconds: the device time keys the rows
    s = spec(time_signal="clock")
    clock = [600, 600, 600, 1200, 1200, 1800, 1800, 1800, 2400]
    r = raw(s, np.arange(9) + 1e6, a=np.arange(9), y=np.zeros(9), clock=clock)
    for chunks in ([r], pieces(r, [2]), pieces(r, [3]), pieces(r, [1, 4, 6, 8])):
        window = fed(s, chunks)
        assert window.time.tolist() == [600, 1200, 1800, 2400]
        assert column(s, window, "a").tolist() == [0, 3, 5, 8]  # the first reading of each
        assert window.late == 0  # a repeat is not late


def test_rows_older_than_the_newest_kept_are_counted_late_and_dropped() -> None:
    s = spec()
    window = RowWindow(s)
    assert window.add(raw(s, [10, 20], a=[1, 2], y=[0, 0])) == 2
    assert window.add(raw(s, [15, 5, 30], a=[3, 4, 5], y=[0, 0, 0])) == 1
    assert window.late == 2 and window.time.tolist() == [10, 20, 30]
    assert window.values[:, 0].tolist() == [1, 2, 5]


# ---- resampling ---------------------------------------------------------------------------


def reference_resample(time: np.ndarray, values: np.ndarray, every: float,
                       how: str) -> tuple[np.ndarray, np.ndarray]:
    """Buckets by hand, the newest one left open."""
    index = np.floor(time / every)
    out_t, out_v = [], []
    for b in np.unique(index)[:-1]:
        sel = values[index == b]
        row = []
        for col in sel.T:
            ok = col[np.isfinite(col)]
            if ok.size == 0:
                row.append(math.nan)
            else:
                row.append({"mean": ok.mean(), "last": ok[-1], "min": ok.min(), "max": ok.max()}[how])
        out_t.append(b * every)
        out_v.append(row)
    return np.asarray(out_t, np.float64), np.asarray(out_v, np.float64).reshape(len(out_t), values.shape[1])


@st.composite
def readings(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Raw rows in time order (times may repeat), two signals, some values missing."""
    n = draw(st.integers(1, 120))
    steps = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 2.5, 7.0, 31.0]), min_size=n, max_size=n))
    time = 1_000.0 + np.cumsum(steps)
    value = st.one_of(st.just(math.nan), st.integers(-50, 50).map(float),
                      st.floats(-1e3, 1e3, allow_nan=False))
    values = np.array([[draw(value), draw(value)] for _ in range(n)], np.float64).reshape(n, 2)
    return time, values


@PROPERTY
@given(readings(), st.sampled_from(rowlib.AGGREGATES), st.sampled_from([1.0, 2.5, 10.0, 60.0]), cuts)
def test_resampling_gives_the_same_rows_in_one_chunk_or_many(
        case: tuple[np.ndarray, np.ndarray], how: str, every: float, where: list[int]) -> None:
    time, values = case
    s = spec(resample_s=every, aggregate=how, window_rows=10_000)
    r = RawRows(time, values)
    whole, chunked = fed(s, [r]), fed(s, pieces(r, where))
    want_t, want_v = reference_resample(time, values, every, how)
    for window in (whole, chunked):
        np.testing.assert_array_equal(window.time, want_t)
        np.testing.assert_allclose(window.values, want_v, rtol=1e-12, atol=1e-9, equal_nan=True)
        assert window.late == 0 and window.added == len(want_t)


def test_the_newest_bucket_stays_open_until_a_later_reading_arrives() -> None:
    s = spec(resample_s=10.0)
    window = RowWindow(s)
    assert window.add(raw(s, [0, 4, 12], a=[1, 3, 10], y=[0, 0, 0])) == 1
    assert window.time.tolist() == [0.0] and window.values[0, 0] == 2.0
    # bucket [10, 20) is still open: a reading of it joins it, a reading of [0, 10) is late
    assert window.add(raw(s, [5, 15], a=[100, 20], y=[0, 0])) == 0
    assert window.late == 1
    assert window.add(raw(s, [21], a=[0], y=[0])) == 1
    assert window.time.tolist() == [0.0, 10.0] and window.values[1, 0] == 15.0


def test_signals_of_different_requests_meet_in_a_resampled_row() -> None:
    # two requests, each with its own timestamps: only resampling puts them in one row
    s = spec(resample_s=60.0)
    r = raw(s, [0, 1, 30, 31, 60], a=[1, math.nan, 3, math.nan, 0], y=[math.nan, 5, math.nan, 7, 0])
    window = fed(s, [r])
    np.testing.assert_array_equal(window.values, [[2.0, 6.0]])
    built = rowlib.build(s, window)
    assert built.x_train.tolist() == [[2.0]] and built.y_train.tolist() == [6.0]


# ---- the window ---------------------------------------------------------------------------


@PROPERTY
@given(st.lists(st.sampled_from([1.0, 3.0, 50.0, 400.0]), min_size=1, max_size=150),
       st.integers(10, 60), st.sampled_from([0.0, 100.0, 1000.0]), cuts)
def test_the_window_keeps_at_most_window_rows_and_nothing_older_than_window_s(
        steps: list[float], window_rows: int, window_s: float, where: list[int]) -> None:
    time = np.cumsum(steps)
    s = spec(window_rows=window_rows, window_s=window_s)
    r = raw(s, time, a=np.arange(len(time)), y=np.zeros(len(time)))
    window = RowWindow(s)
    for chunk in pieces(r, where):
        window.add(chunk)
        assert len(window) <= window_rows
        if window_s > 0:
            assert window.time.min() >= window.time.max() - window_s
    keep = time >= time.max() - window_s if window_s > 0 else np.ones(len(time), bool)
    np.testing.assert_array_equal(window.time, time[keep][-window_rows:])  # the newest ones
    assert window.added == len(time)


# ---- gaps, validity, exclusions -------------------------------------------------------------


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from([1.0, 2.0, 5.0, 30.0]),
                          st.one_of(st.just(math.nan), st.integers(0, 9).map(float)),
                          st.one_of(st.just(math.nan), st.integers(0, 9).map(float))),
                min_size=1, max_size=60),
       st.sampled_from([0.0, 1.0, 4.0, 30.0]))
def test_fill_gaps_carries_a_reading_forward_at_most_fill_gap_s(
        rows: list[tuple[float, float, float]], gap: float) -> None:
    time = np.cumsum([r[0] for r in rows])
    values = np.array([[r[1], r[2]] for r in rows])
    out = rowlib.fill_gaps(time, values, gap)
    for col in range(2):
        last = None  # (time, value) of the last reading
        for i, t in enumerate(time):
            v = values[i, col]
            if np.isfinite(v):
                assert out[i, col] == v
                last = (t, v)
            elif last is not None and t - last[0] <= gap:
                assert out[i, col] == last[1]
            else:
                assert math.isnan(out[i, col])


def test_a_gap_longer_than_fill_gap_s_leaves_the_row_out() -> None:
    s = spec(fill_gap_s=10.0)
    r = raw(s, [0, 5, 10, 30], a=[1, math.nan, math.nan, math.nan], y=[0, 0, 0, 0])
    built = rowlib.build(s, fed(s, [r]))
    assert built.x_train.tolist() == [[1.0], [1.0], [1.0]] and built.rows == 4
    assert built.usable == 3


def _identified(s: RowSpec, n: int, **signals: object) -> RowWindow:
    """A window of ``n`` rows one second apart whose feature ``id`` is the row number."""
    return fed(s, [raw(s, np.arange(n, dtype=float), id=np.arange(n), **signals)])


def test_invalid_and_excluded_rows_are_neither_trained_on_nor_judged() -> None:
    s = spec(("id", "a"), valid=(("a", 0.0, 100.0), ("t", -40.0, 50.0)),
             exclude=(rowlib.parse_exclusion("y <= 0 and a > 50"),),
             holdout_every=2, holdout_block_s=10.0)
    n = 200
    rng = np.random.default_rng(3)
    a = rng.uniform(-20, 120, n)
    y = rng.uniform(-5, 5, n)
    t = rng.uniform(-60, 60, n)
    built = rowlib.build(s, _identified(s, n, a=a, y=y, t=t))
    good = (a >= 0) & (a <= 100) & (t >= -40) & (t <= 50) & ~((y <= 0) & (a > 50))
    trained = set(built.x_train[:, 0].astype(int))
    judged = set(built.x_holdout[:, 0].astype(int))
    assert trained | judged == set(np.flatnonzero(good))
    assert not trained & judged
    assert built.usable == int(good.sum()) and built.rows == n
    assert set(s.signals) == {"id", "a", "y", "t"}  # validity signals are read too


def test_a_missing_reading_of_an_exclusion_signal_does_not_exclude() -> None:
    s = spec(exclude=(rowlib.parse_exclusion("p <= 0"),))
    built = rowlib.build(s, fed(s, [raw(s, [0, 1, 2], a=[1, 2, 3], y=[0, 0, 0], p=[0, math.nan, 5])]))
    assert built.x_train[:, 0].tolist() == [2.0, 3.0]


# ---- holdout ------------------------------------------------------------------------------


@PROPERTY
@given(st.lists(st.integers(0, 400), min_size=1, max_size=150, unique=True),
       st.integers(2, 6), st.integers(5, 40), st.integers(-100, 100), st.data())
def test_holdout_blocks_and_embargo_partition_the_rows(
        times: list[int], every: int, block: int, origin: int, data: st.DataObject) -> None:
    embargo = data.draw(st.integers(0, block - 1), label="embargo")
    time = np.sort(np.asarray(times, np.float64))
    s = spec(("id",), holdout_every=every, holdout_block_s=float(block),
             holdout_origin_s=float(origin), embargo_s=float(embargo), window_rows=10_000)
    window = fed(s, [raw(s, time, id=np.arange(len(time)), y=np.zeros(len(time)))])
    built = rowlib.build(s, window)
    trained = set(built.x_train[:, 0].astype(int))
    held = set(built.x_holdout[:, 0].astype(int))
    assert not trained & held
    index = np.floor((time - origin) / block).astype(int)
    assert held == set(np.flatnonzero(index % every == every - 1))
    for i in range(len(time)):
        if i in held:
            continue
        # distance to the holdout blocks before and after this row
        prev_end = ((index[i] - (index[i] + 1) % every) + 1) * block + origin
        next_start = (index[i] + (every - 1 - index[i] % every)) * block + origin
        distance = min(time[i] - prev_end, next_start - time[i])
        if i in trained:
            assert distance >= embargo
        elif distance > embargo:
            pytest.fail(f"row at {time[i]} is {distance} s from a holdout block, embargo {embargo}")
    np.testing.assert_array_equal(built.t_train, time[sorted(trained)])


def test_embargo_longer_than_a_block_keeps_training_rows_that_far_from_holdout() -> None:
    # blocks of 10 s, every 5th held out ([40, 50) and [90, 100)): an embargo of 15 s keeps
    # training rows 15 s away from them, not only out of the neighbouring blocks
    s = spec(("id",), holdout_every=5, holdout_block_s=10.0, embargo_s=15.0)
    built = rowlib.build(s, _identified(s, 100, y=np.zeros(100)))
    assert built.x_holdout[:, 0].tolist() == [*range(40, 50), *range(90, 100)]
    near = [t for t in built.t_train for start in (40.0, 90.0)
            if not (start - t > 15.0 or t - (start + 10.0) >= 15.0)]
    assert not near, f"training rows within 15 s of a holdout block: {near}"


def test_holdout_every_0_holds_nothing_out() -> None:
    s = spec(("id",), holdout_every=0, embargo_s=5.0, holdout_block_s=10.0)
    built = rowlib.build(s, _identified(s, 100, y=np.zeros(100)))
    assert len(built.x_train) == 100 and len(built.x_holdout) == 0


def test_holdout_blocks_are_counted_from_the_origin() -> None:
    s0 = spec(("id",), holdout_every=2, holdout_block_s=10.0)
    s5 = spec(("id",), holdout_every=2, holdout_block_s=10.0, holdout_origin_s=5.0)
    h0 = rowlib.build(s0, _identified(s0, 30, y=np.zeros(30))).x_holdout[:, 0]
    h5 = rowlib.build(s5, _identified(s5, 30, y=np.zeros(30))).x_holdout[:, 0]
    assert h0.tolist() == list(range(10, 20))
    assert h5.tolist() == [*range(0, 5), *range(15, 25)]  # [-5, 5) is block -1, held out


# ---- statistics ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["regression", "classification", "anomaly"])
def test_statistics_are_the_centred_sums_over_the_training_rows(task: str) -> None:
    target = "" if task == "anomaly" else "y"
    s = spec(("w", "sin(d)", "cos(d)"), target, task=task, valid=(("w", 0.0, 25.0),),
             holdout_every=4, holdout_block_s=50.0)
    n = 400
    rng = np.random.default_rng(11)
    w = rng.uniform(-2, 30, n)
    d = rng.uniform(0, 360, n)
    y = rng.integers(0, 3, n).astype(float)
    given = {"w": w, "d": d, **({"y": y} if target else {})}
    built = rowlib.build(s, fed(s, [raw(s, np.arange(n, dtype=float), **given)]))
    columns, count, sums, m2 = rowlib.statistics(s.task, s.feature_names, s.target,
                                                      built.x_train, built.y_train)
    # the training rows, found without the window: valid w, outside every 4th block of 50 s
    train = (w >= 0) & (w <= 25) & ((np.arange(n) // 50) % 4 != 3)
    data = np.column_stack([w, np.sin(np.deg2rad(d)), np.cos(np.deg2rad(d))])[train]
    names: tuple[str, ...] = ("w", "sin(d)", "cos(d)")
    if task == "regression":
        data, names = np.column_stack([data, y[train]]), (*names, "y")
    assert columns == names and count == int(train.sum())
    np.testing.assert_allclose(sums, data.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m2, np.square(data - data.mean(axis=0)).sum(axis=0), rtol=1e-12)


def test_a_record_counter_that_goes_back_is_counted() -> None:
    s = spec(("a",), record_signal="seq")
    window = fed(s, [raw(s, [1, 2, 3], a=[1, 2, 3], y=[0, 0, 0], seq=[10, 11, 12]),
                     raw(s, [4, 5], a=[4, 5], y=[0, 0], seq=[0, 1])])  # the device restarted
    assert window.record_resets == 1 and len(window) == 5
