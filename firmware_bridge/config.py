"""Bridge register maps: TOML -> frozen objects, with every mistake caught at load.

A bridge file has one ``[bridge]`` table (where samples go) and one ``[[device]]`` table
per device, each with ``[[device.signal]]`` tables. The reference for field engineers is
docs/field-bus.md; the simulator's map (firmware_bridge/maps/wind_turbine.toml) is a
complete example.

Everything that can be known wrong before touching a wire is rejected here with a
:class:`~fedcore.errors.ConfigError` naming file, key and value: unknown keys, a type that
does not fit its function (a float in a coil), registers past address 65535, two signals
sharing a register, two devices claiming one unit id on one bus, serial settings that
disagree on one shared RS-485 port, line-sensor signals missing from the line format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedcore.config import Section, load_toml
from fedcore.errors import ConfigError
from firmware_bridge.registers import WORD_ORDERS, DataType, Encoding, Function

PROTOCOLS = ("modbus_tcp", "modbus_rtu", "serial_lines")
LINE_FORMATS = ("csv", "kv")


@dataclass(frozen=True, slots=True)
class SignalSpec:
    name: str
    unit: str
    period: float  # seconds between reads
    encoding: Encoding | None = None  # Modbus signals
    source: str | None = None  # line sensors: CSV column name or key of key=value

    @property
    def scale(self) -> float:
        return self.encoding.scale if self.encoding else 1.0


@dataclass(frozen=True, slots=True)
class TcpLink:
    host: str
    port: int

    @property
    def bus(self) -> str:
        return f"tcp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RtuLink:
    port: str
    baudrate: int
    parity: str  # N, E, O
    stopbits: int
    bytesize: int

    @property
    def bus(self) -> str:
        return f"rtu://{self.port}"


@dataclass(frozen=True, slots=True)
class LineLink:
    port: str  # a device path or a pyserial URL (loop://, socket://host:port)
    baudrate: int
    format: str  # csv | kv
    columns: tuple[str, ...]  # csv only
    separator: str

    @property
    def bus(self) -> str:
        return f"lines://{self.port}"


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    name: str
    link: TcpLink | RtuLink | LineLink
    unit_id: int
    timeout: float
    retries: int
    backoff_initial: float
    backoff_max: float
    max_gap: int
    signals: tuple[SignalSpec, ...]


@dataclass(frozen=True, slots=True)
class StoreSpec:
    path: Path
    max_bytes: int
    max_age_s: float
    flush_interval: float


@dataclass(frozen=True, slots=True)
class MetricsSpec:
    port: int = 0  # Prometheus exporter on /metrics; 0 = off
    addr: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    file: str
    store: StoreSpec
    devices: tuple[DeviceSpec, ...]
    metrics: MetricsSpec = MetricsSpec()


def load_bridge_config(path: str | Path) -> BridgeConfig:
    return parse_bridge_config(load_toml(path))


def is_bridge_config(root: Section) -> bool:
    return root.has("device") or root.has("bridge")


def parse_bridge_config(root: Section) -> BridgeConfig:
    bridge = root.section("bridge", required=True)
    store = _store(bridge)
    metrics = _metrics(bridge)
    bridge.reject_unknown()
    tables = root.sections("device")
    if not tables:
        raise root.error("device", None, "at least one [[device]] table is required")
    devices = tuple(_device(t) for t in tables)
    root.reject_unknown()
    _check_devices(tables, devices)
    return BridgeConfig(root.file, store, devices, metrics)


def _store(sec: Section) -> StoreSpec:
    return StoreSpec(
        path=sec.path("store"),
        max_bytes=int(sec.float("max_store_mb", 256.0, min=1.0) * 1024 * 1024),
        max_age_s=sec.float("max_age_days", 30.0, min=0.001) * 86400.0,
        flush_interval=sec.float("flush_interval", 0.5, min=0.01, max=60.0),
    )


def _metrics(sec: Section) -> MetricsSpec:
    addr = sec.str("metrics_addr", "127.0.0.1")
    if not addr.strip():
        raise sec.error("metrics_addr", addr, "must be an address to listen on, e.g. 127.0.0.1")
    return MetricsSpec(sec.int("metrics_port", 0, min=0, max=65535), addr)


def _device(sec: Section) -> DeviceSpec:
    name = sec.str("name")
    if not name or "/" in name:
        raise sec.error("name", name, "must be a non-empty name without '/'")
    protocol = sec.str("protocol", choices=PROTOCOLS)
    link: TcpLink | RtuLink | LineLink
    if protocol == "modbus_tcp":
        link = TcpLink(sec.str("host"), sec.int("port", 502, min=1, max=65535))
    else:
        port = sec.str("serial_port")
        baudrate = sec.int(
            "baudrate", 9600 if protocol == "modbus_rtu" else 115200, min=300, max=4_000_000
        )
        if protocol == "modbus_rtu":
            link = RtuLink(
                port,
                baudrate,
                sec.str("parity", "N", choices=("N", "E", "O")),
                sec.int("stopbits", 1, min=1, max=2),
                sec.int("bytesize", 8, min=7, max=8),
            )
        else:
            fmt = sec.str("format", choices=LINE_FORMATS)
            columns = sec.str_list("columns", ()) if fmt == "csv" else ()
            if fmt == "csv" and not columns:
                raise sec.error("columns", None, "format = 'csv' needs the list of column names")
            if len(set(columns)) != len(columns):
                raise sec.error("columns", list(columns), "column names must be unique")
            link = LineLink(port, baudrate, fmt, columns, sec.str("separator", ","))
    is_modbus = protocol != "serial_lines"
    default_period = sec.float("period", 1.0, min=0.001, max=86400.0)
    timeout = sec.float("timeout", 1.0, min=0.01, max=60.0)
    retries = sec.int("retries", 1, min=0, max=10)
    backoff_initial = sec.float("backoff_initial", 0.5, min=0.01, max=3600.0)
    backoff_max = sec.float("backoff_max", 30.0, min=0.01, max=3600.0)
    if backoff_max < backoff_initial:
        raise sec.error(
            "backoff_max", backoff_max, f"must be >= backoff_initial ({backoff_initial})"
        )
    unit_id = sec.int("unit_id", 1, min=0, max=247) if is_modbus else 0
    max_gap = sec.int("max_gap", 8, min=0, max=100) if is_modbus else 0
    sig_tables = sec.sections("signal")
    if not sig_tables:
        raise sec.error("signal", None, "a device needs at least one [[device.signal]]")
    signals = tuple(
        _signal(t, default_period, link if isinstance(link, LineLink) else None) for t in sig_tables
    )
    sec.reject_unknown()
    _check_signals(sig_tables, signals)
    return DeviceSpec(
        name, link, unit_id, timeout, retries, backoff_initial, backoff_max, max_gap, signals
    )


def _signal(sec: Section, default_period: float, line: LineLink | None) -> SignalSpec:
    name = sec.str("name")
    if not name or "/" in name:
        raise sec.error("name", name, "must be a non-empty name without '/'")
    unit = sec.str("unit", "")
    period = sec.float("period", default_period, min=0.001, max=86400.0)
    scale = sec.float("scale", 1.0)
    if scale == 0.0:
        raise sec.error("scale", scale, "must not be zero (every reading would be the offset)")
    offset = sec.float("offset", 0.0)
    if line is not None:
        source = sec.str("source", name)
        if line.format == "csv" and source not in line.columns:
            raise sec.error(
                "source", source, f"not one of the device's columns {list(line.columns)}"
            )
        spec = SignalSpec(
            name,
            unit,
            period,
            Encoding(Function.INPUT, 0, DataType.F32, "ABCD", scale, offset),
            source,
        )
        sec.reject_unknown()
        return spec
    function = Function(sec.str("function", choices=[f.value for f in Function]))
    default_type = "bool" if function.is_bit else None
    dtype = DataType(sec.str("type", default_type, choices=[d.value for d in DataType]))
    if function.is_bit != (dtype is DataType.BOOL):
        problem = (
            f"a {function.value} is one bit: use type = 'bool'"
            if function.is_bit
            else f"'bool' is only for coils and discrete inputs, not {function.value} registers"
        )
        raise sec.error("type", dtype.value, problem)
    order = sec.str("order", "ABCD", choices=WORD_ORDERS)
    address = sec.int("address", min=0, max=65535)
    if address + dtype.words > 65536:
        raise sec.error(
            "address", address, f"a {dtype.value} needs {dtype.words} registers: past 65535"
        )
    spec = SignalSpec(name, unit, period, Encoding(function, address, dtype, order, scale, offset))
    sec.reject_unknown()
    return spec


def _check_signals(tables: list[Section], signals: tuple[SignalSpec, ...]) -> None:
    seen: dict[str, int] = {}
    for i, sig in enumerate(signals):
        if sig.name in seen:
            raise tables[i].error(
                "name", sig.name, f"duplicate signal name (also signal[{seen[sig.name]}])"
            )
        seen[sig.name] = i
    taken: dict[tuple[str, int], int] = {}
    for i, sig in enumerate(signals):
        enc = sig.encoding
        if enc is None or sig.source is not None:
            continue
        for addr in range(enc.address, enc.end):
            other = taken.get((enc.function.value, addr))
            if other is not None:
                raise tables[i].error(
                    "address",
                    enc.address,
                    f"{enc.function.value} register {addr} is also used by signal "
                    f"'{signals[other].name}' (overlapping registers)",
                )
            taken[(enc.function.value, addr)] = i


def _check_devices(tables: list[Section], devices: tuple[DeviceSpec, ...]) -> None:
    names: set[str] = set()
    buses: dict[str, DeviceSpec] = {}
    ids: set[tuple[str, int]] = set()
    for i, dev in enumerate(devices):
        if dev.name in names:
            raise tables[i].error("name", dev.name, "duplicate device name")
        names.add(dev.name)
        bus = dev.link.bus
        first = buses.setdefault(bus, dev)
        if isinstance(dev.link, LineLink) and first is not dev:
            raise tables[i].error(
                "serial_port", dev.link.port, f"already used by device '{first.name}'"
            )
        if isinstance(dev.link, RtuLink) and first.link != dev.link:
            raise tables[i].error(
                "serial_port",
                dev.link.port,
                f"shared RS-485 line: baudrate/parity/stopbits/bytesize differ from device '{first.name}'",
            )
        if (bus, dev.unit_id) in ids and not isinstance(dev.link, LineLink):
            raise tables[i].error(
                "unit_id", dev.unit_id, f"another device on {bus} has this unit id"
            )
        ids.add((bus, dev.unit_id))


def explain(error: ConfigError) -> str:
    """A one-paragraph explanation of a config error for `fedgate config check`."""
    return f"{error.file}\n  key:     {error.key}\n  value:   {error.value!r}\n  problem: {error.problem}"
