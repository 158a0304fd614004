"""`fedgate demo --field-bus`: each gateway learns from rows that crossed a Modbus link.

Theory of operation
-------------------
The plain demo hands every gateway its turbine's rows straight from the data set. With
``--field-bus`` the same rows take the plant's road instead::

    simulated turbine (pymodbus server, one free loopback port per turbine)
        --Modbus TCP--> `fedgate bridge run -c bridge-<gw>.toml` (one process per gateway)
        --> store-<gw>.db (SQLite sample store) --> `fedgate edge run` with data.source = "store"

The turbines replay rows ``[start, start + rows)`` of their series in lockstep
(``advance="read"``: one record per poll, so no row is skipped or read twice whatever the
machine load). The demo waits until every store holds that many records, stops the bridges
(SIGTERM, as systemd would) and checks that the stored rows are bit for bit the data set's
rows for the same record numbers. The gateways then learn from their stores as any plant's
gateways do: the wind task is written on the turbine's signals in their config
(``fedgate.demo_configs.WIND_STORE_TASK``) and the fleet scaler comes from the statistics
round of the lineage (docs/decisions.md).

The observer and the baselines use the direct path on the same rows
(:func:`fedcore.datasets.wind.load_wind_rows`), so the printed comparison is on identical
test rows; the observer feeds each model the raw test rows standardised with the model's own
fleet scaler (``scaled_for``). ``--field-bus direct`` runs the same rows without Modbus (edges read the data
set), which is the reference a field-bus run is compared with (bench/RESULTS_fieldbus.md).
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.datasets import FederatedDataset
from fedcore.datasets.base import DatasetError, Scaler
from fedcore.datasets.wind import DATA_FILE, load_wind_rows
from fedcore.protocol.messages import ModelSpec
from fedgate.demo_configs import DemoFailed, DemoOptions, device_id, store_path

MODES = ("modbus", "direct")
POLL_PERIOD_S = 0.001  # as fast as the link answers: lockstep replay, one record per poll
SIGNALS_PER_ROW = 9  # row_time, the 7 SCADA columns, row_seq (firmware_bridge/maps/wind_turbine.toml)


def field_bus_dataset(options: DemoOptions) -> FederatedDataset:
    """The direct path on the replayed rows: observer test split, baselines, fleet scaler."""
    if options.field_bus not in MODES:
        raise DatasetError("demo", "field_bus", options.field_bus, f"must be one of {', '.join(MODES)}")
    if options.dataset != "wind" or options.gateways not in (0, 4):
        raise DatasetError("demo", "dataset", options.dataset,
                           "the field bus simulates the 4 wind turbines: use --dataset wind "
                           "without --gateways")
    if options.max_rows_per_unit:
        raise DatasetError("demo", "max_rows_per_unit", options.max_rows_per_unit,
                           "with the field bus, --field-bus-rows sets the rows replayed")
    return load_wind_rows(options.field_bus_start, options.field_bus_rows)


def fill_stores(workdir: Path, options: DemoOptions, dataset: FederatedDataset,
                say: Callable[[str], None]) -> dict[str, Any]:
    """Replay the rows over Modbus into one store per gateway (``modbus`` mode); returns
    what crossed, for the run record."""
    first, count = options.field_bus_start, options.field_bus_rows
    units = list(dataset.units)
    if options.field_bus == "direct":
        say(f"field bus: off for comparison; gateways read rows [{first}, {first + count}) of "
            "each turbine from the data set")
        return {"mode": "direct", "first_row": first, "rows": count}
    from firmware_bridge.simulator import (
        SimulatedDevice,
        SimulatedTurbine,
        SimulatorServer,
        wind_bridge_toml,
    )

    sim = SimulatorServer()
    bridges: dict[str, subprocess.Popen[bytes]] = {}
    try:
        ports = {u: sim.add(SimulatedTurbine(u, advance="read", start_row=first), 0) for u in units}
        say(f"field bus: {len(units)} simulated turbines (Modbus TCP on 127.0.0.1 ports "
            f"{', '.join(str(p) for p in ports.values())}) replay rows [{first}, {first + count})")
        for u in units:
            store = store_path(workdir, u)
            for old in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
                old.unlink(missing_ok=True)  # a rerun in the same folder starts empty
            conf = workdir / f"bridge-{device_id(u)}.toml"
            conf.write_text(wind_bridge_toml([SimulatedDevice(u, ports[u])], store,
                                             period=POLL_PERIOD_S, timeout=2.0))
            log = open(workdir / f"bridge-{device_id(u)}.log", "ab")
            bridges[u] = subprocess.Popen([sys.executable, "-m", "fedgate", "bridge", "run", "-c", str(conf)],
                                          stdout=log, stderr=log, start_new_session=True)
        seconds = _wait_for_rows(workdir, bridges, count, options.timeout_s)
    finally:
        for proc in bridges.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the bridge flushes and exits 0
        for proc in bridges.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sim.close()
    crossed = {u: check_store(store_path(workdir, u), u, first, count) for u in units}
    for u, c in crossed.items():
        say(f"  {u}: {c['rows_in_window']}/{count} rows crossed Modbus into {store_path(workdir, u).name} "
            f"({c['identical']} bit-identical to the data set, {c['rows_stored']} stored in all)")
    say(f"field bus: {count} rows x {len(units)} turbines over Modbus in {seconds:.1f} s "
        f"({count * len(units) / max(seconds, 1e-9):.0f} rows/s); gateways train from their stores")
    return {"mode": "modbus", "first_row": first, "rows": count, "seconds": seconds,
            "per_gateway": crossed}


def _wait_for_rows(workdir: Path, bridges: dict[str, subprocess.Popen[bytes]], count: int,
                   timeout_s: float) -> float:
    """Seconds until every store holds ``count`` rows; raises if a bridge dies or time runs out."""
    from edge.store import SampleStore
    from fedcore.samples import StoreUnavailable

    t0 = time.monotonic()
    pending = set(bridges)
    while pending:
        for u in sorted(pending):
            proc = bridges[u]
            if proc.poll() is not None:
                raise DemoFailed(f"the bridge of {u} exited with code {proc.returncode}; "
                                   f"see {workdir}/bridge-{device_id(u)}.log")
            path = store_path(workdir, u)
            if not path.exists():
                continue
            try:
                store = SampleStore(path, readonly=True)
            except StoreUnavailable:
                continue  # the bridge has not created it yet
            try:
                if store.count(u) >= count * SIGNALS_PER_ROW:
                    pending.discard(u)
            finally:
                store.close()
        if time.monotonic() - t0 > timeout_s:
            raise DemoFailed(f"the bridges did not deliver {count} rows within {timeout_s:.0f} s")
        if pending:
            time.sleep(0.2)
    return time.monotonic() - t0


def scaled_for(dataset: FederatedDataset, spec: ModelSpec) -> FederatedDataset:
    """``dataset`` (scaled with its own scaler) re-scaled with the fleet scaler of ``spec``
    (the statistics round's): what a model trained by store-fed gateways takes."""
    if not spec.has_scaler:
        return dataset
    old = dataset.scaler
    new = Scaler(np.asarray(spec.feature_mean), np.asarray(spec.feature_std), spec.target_mean,
                 spec.target_std)

    def x(a: np.ndarray) -> np.ndarray:
        return new.transform(np.asarray(a, np.float64) * old.feature_std + old.feature_mean)

    def y(a: np.ndarray) -> np.ndarray:
        return new.transform_target(old.inverse_target(a))

    units = {name: dataclasses.replace(u, x_train=x(u.x_train), y_train=y(u.y_train),
                                       x_test=x(u.x_test), y_test=y(u.y_test))
             for name, u in dataset.units.items()}
    return dataclasses.replace(dataset, units=units, scaler=new)


def store_rows(path: Path, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record numbers, row times, raw values ``(n, 7)`` float32 in the data set's column
    order) of one simulated turbine in a store, one row per record: what the demo compares
    with the data set to show that every row crossed the bus intact."""
    from edge.store import SampleStore
    from firmware_bridge.simulator import SEQ_SIGNAL, TIME_SIGNAL, WIND_COLUMNS

    store = SampleStore(path, readonly=True)
    try:
        rows = store.rows(device, (*WIND_COLUMNS, SEQ_SIGNAL), time_signal=TIME_SIGNAL,
                          seq_signal=SEQ_SIGNAL)
    finally:
        store.close()
    # row_seq travels as a float32 column: exact for record numbers below 2**24
    return rows.values[:, -1].astype(np.int64), rows.time.astype(np.int64), rows.values[:, :-1]


def check_store(path: Path, unit: str, first: int, count: int) -> dict[str, int]:
    """How many of the records ``[first, first + count)`` the store holds, and how many of
    those equal the data set's row bit for bit (NaN included)."""
    seq, t, values = store_rows(path, unit)
    window = (seq >= first) & (seq < first + count)
    with np.load(DATA_FILE) as npz:
        ref_t = npz[f"{unit}_time"][seq[window]]
        ref_v = np.asarray(npz[f"{unit}_values"], dtype=np.float32)[seq[window]]
    got = values[window]
    # NaN (a missing SCADA value) has many bit patterns; it must stay NaN, the rest exact
    cell = (got.view(np.uint32) == ref_v.view(np.uint32)) | (np.isnan(got) & np.isnan(ref_v))
    same = cell.all(axis=1) & (t[window] == ref_t)
    return {"rows_in_window": int(window.sum()), "identical": int(same.sum()),
            "rows_stored": int(seq.size)}
