"""Register maps: the shipped map loads; every kind of mistake names file, key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.errors import ConfigError
from fedgate.cli_config import check_file, detect_kind
from firmware_bridge.config import LineLink, MetricsSpec, RtuLink, load_bridge_config
from firmware_bridge.registers import DataType, Function
from firmware_bridge.simulator import WIND_MAP

HEAD = '[bridge]\nstore = "s.db"\n'
TCP = '[[device]]\nname = "{name}"\nprotocol = "modbus_tcp"\nhost = "10.0.0.5"\nunit_id = {uid}\n'


def sig(
    name: str, address: int, type_: str = "u16", function: str = "holding", extra: str = ""
) -> str:
    return f'[[device.signal]]\nname = "{name}"\nfunction = "{function}"\naddress = {address}\ntype = "{type_}"\n{extra}'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bridge.toml"
    p.write_text(text)
    return p


def test_shipped_map_loads() -> None:
    cfg = load_bridge_config(WIND_MAP)
    (dev,) = cfg.devices
    assert [s.name for s in dev.signals] == [
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
    p = dev.signals[2]
    assert p.unit == "kW" and p.encoding is not None
    assert (p.encoding.function, p.encoding.address, p.encoding.dtype, p.encoding.order) == (
        Function.INPUT,
        4,
        DataType.F32,
        "CDAB",
    )
    assert cfg.store.path == WIND_MAP.parent / "samples.db"


def test_rtu_and_line_devices(tmp_path: Path) -> None:
    text = HEAD + (
        '[[device]]\nname = "pump"\nprotocol = "modbus_rtu"\nserial_port = "/dev/ttyUSB0"\nbaudrate = 19200\nparity = "E"\nunit_id = 3\n'
        + sig("flow", 0, "i32", extra="scale = 0.01\nperiod = 0.5\n")
        + '[[device]]\nname = "air"\nprotocol = "serial_lines"\nserial_port = "loop://"\nformat = "csv"\ncolumns = ["t", "h"]\n'
        + '[[device.signal]]\nname = "temp"\nsource = "t"\nunit = "degC"\n'
    )
    cfg = load_bridge_config(write(tmp_path, text))
    pump, air = cfg.devices
    assert pump.link == RtuLink("/dev/ttyUSB0", 19200, "E", 1, 8)
    assert pump.signals[0].period == 0.5 and pump.signals[0].scale == 0.01
    assert isinstance(air.link, LineLink) and air.signals[0].source == "t"


BAD = [
    # (body, key, value, words in the problem)
    (
        TCP.format(name="a", uid=1) + sig("x", 0, "f32") + sig("y", 1),
        "device[0].signal[1].address",
        1,
        "overlapping",
    ),
    (
        TCP.format(name="a", uid=1) + sig("x", 0, "f32", function="coil"),
        "device[0].signal[0].type",
        "f32",
        "one bit",
    ),
    (
        TCP.format(name="a", uid=1) + sig("x", 0, "bool"),
        "device[0].signal[0].type",
        "bool",
        "only for coils",
    ),
    (
        TCP.format(name="a", uid=1) + sig("x", 65535, "u32"),
        "device[0].signal[0].address",
        65535,
        "past 65535",
    ),
    (
        TCP.format(name="a", uid=1) + sig("x", 0, "u16", extra="order = 'XYZW'\n"),
        "device[0].signal[0].order",
        "XYZW",
        "one of",
    ),
    (
        TCP.format(name="a", uid=1) + sig("x", 0, "u16", extra="scal = 2\n"),
        "device[0].signal[0].scal",
        2,
        "unknown key",
    ),
    (
        TCP.format(name="a", uid=1) + sig("x", 0, "u16", extra="scale = 0\n"),
        "device[0].signal[0].scale",
        0.0,
        "zero",
    ),
    (
        TCP.format(name="a", uid=1) + sig("x", 0) + sig("x", 4),
        "device[0].signal[1].name",
        "x",
        "duplicate",
    ),
    (
        TCP.format(name="a", uid=1) + sig("x", 0) + TCP.format(name="b", uid=1) + sig("y", 0),
        "device[1].unit_id",
        1,
        "unit id",
    ),
    (TCP.format(name="a", uid=300) + sig("x", 0), "device[0].unit_id", 300, "<= 247"),
    (TCP.format(name="a", uid=1), "device[0].signal", None, "at least one"),
    (
        '[[device]]\nname = "s"\nprotocol = "serial_lines"\nserial_port = "loop://"\nformat = "csv"\ncolumns = ["a"]\n[[device.signal]]\nname = "b"\n',
        "device[0].signal[0].source",
        "b",
        "not one of",
    ),
    ('[[device]]\nname = "s"\nprotocol = "canbus"\n', "device[0].protocol", "canbus", "one of"),
]


@pytest.mark.parametrize(("body", "key", "value", "problem"), BAD)
def test_bad_maps_are_explained(
    tmp_path: Path, body: str, key: str, value: object, problem: str
) -> None:
    path = write(tmp_path, HEAD + body)
    with pytest.raises(ConfigError) as err:
        load_bridge_config(path)
    assert err.value.file == str(path)
    assert err.value.key == key
    assert err.value.value == value
    assert problem in err.value.problem


def test_metrics_keys(tmp_path: Path) -> None:
    body = TCP.format(name="a", uid=1) + sig("x", 0)
    assert load_bridge_config(write(tmp_path, HEAD + body)).metrics == MetricsSpec(0, "127.0.0.1")
    on = HEAD + 'metrics_port = 9101\nmetrics_addr = "0.0.0.0"\n' + body
    assert load_bridge_config(write(tmp_path, on)).metrics == MetricsSpec(9101, "0.0.0.0")
    for extra, key, value in [
        ("metrics_port = 70000\n", "bridge.metrics_port", 70000),
        ('metrics_addr = ""\n', "bridge.metrics_addr", ""),
        ("metrics_prot = 9101\n", "bridge.metrics_prot", 9101),
    ]:
        with pytest.raises(ConfigError) as err:
            load_bridge_config(write(tmp_path, HEAD + extra + body))
        assert (err.value.key, err.value.value) == (key, value)


def test_shared_rtu_line_settings_must_agree(tmp_path: Path) -> None:
    dev = '[[device]]\nname = "{n}"\nprotocol = "modbus_rtu"\nserial_port = "/dev/ttyS1"\nbaudrate = {b}\nunit_id = {u}\n'
    body = (
        dev.format(n="a", b=9600, u=1) + sig("x", 0) + dev.format(n="b", b=19200, u=2) + sig("y", 0)
    )
    with pytest.raises(ConfigError) as err:
        load_bridge_config(write(tmp_path, HEAD + body))
    assert err.value.key == "device[1].serial_port" and "shared RS-485" in err.value.problem


def test_config_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check_file(str(WIND_MAP)) == 0
    assert "valid bridge config" in capsys.readouterr().out
    bad = write(tmp_path, HEAD + TCP.format(name="a", uid=1) + sig("x", 0, "f32") + sig("y", 1))
    assert check_file(str(bad)) == 78
    out = capsys.readouterr().out
    assert "device[0].signal[1].address" in out and "overlapping" in out and "fix:" in out
    assert check_file(str(write(tmp_path, "x = 1\n"))) == 2
    assert detect_kind({"device": {"id": "g1"}}) == "edge"
    assert detect_kind({"task": {"name": "t"}}) == "aggregator"
    broken = tmp_path / "broken.toml"
    broken.write_text("[bridge\n")
    assert check_file(str(broken)) == 78
    assert "not valid TOML" in capsys.readouterr().out
