"""Line sensors: parsing tables, pyserial loop://, and a pty standing in for a real port."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import serial

from fedcore.errors import RemoteProtocolError
from firmware_bridge.config import LineLink, load_bridge_config
from firmware_bridge.serial_reader import LinePoller, parse_line

CSV = LineLink("loop://", 115200, "csv", ("t", "h", "p"), ",")
KV = LineLink("loop://", 115200, "kv", (), ",")


@pytest.mark.parametrize(
    ("line", "link", "expected"),
    [
        ("21.5,40.25,1013\r\n", CSV, {"t": 21.5, "h": 40.25, "p": 1013.0}),
        (" -3 , 0 , 1e3 ", CSV, {"t": -3.0, "h": 0.0, "p": 1000.0}),
        ("temp=21.5 hum=40", KV, {"temp": 21.5, "hum": 40.0}),
        ("temp=21.5,hum=40;p=1", KV, {"temp": 21.5, "hum": 40.0, "p": 1.0}),
    ],
)
def test_parse(line: str, link: LineLink, expected: dict[str, float]) -> None:
    assert parse_line(line, link) == expected


@pytest.mark.parametrize(
    ("line", "link", "reason"),
    [
        ("1,2", CSV, "bad_line"),
        ("1,x,3", CSV, "bad_value"),
        ("temp", KV, "bad_line"),
        ("t=inf", KV, "bad_value"),
        ("", CSV, "empty_line"),
    ],
)
def test_parse_rejects(line: str, link: LineLink, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        parse_line(line, link)
    assert err.value.reason == reason


def _config(tmp_path: Path, port: str, fmt: str) -> Path:
    cols = 'columns = ["t", "h"]\n' if fmt == "csv" else ""
    text = (
        f'[bridge]\nstore = "s.db"\n[[device]]\nname = "air"\nprotocol = "serial_lines"\nserial_port = "{port}"\n'
        f'format = "{fmt}"\n{cols}timeout = 0.2\nperiod = 0.1\n'
        '[[device.signal]]\nname = "temp"\nsource = "t"\nunit = "degC"\n'
        '[[device.signal]]\nname = "hum"\nsource = "h"\nunit = "%"\nscale = 0.5\n'
    )
    p = tmp_path / "lines.toml"
    p.write_text(text)
    return p


def test_loop_port_keeps_latest_good_line(tmp_path: Path) -> None:
    spec = load_bridge_config(_config(tmp_path, "loop://", "csv")).devices[0]
    port = serial.serial_for_url("loop://", timeout=0.1)
    poller = LinePoller(spec, random.Random(0), 0.0, opener=lambda link, timeout: port)
    port.write(b"20.0,50\n21.0,52\ngarbage\n22.")
    got = poller.poll(0.0, 100.0)
    assert [(s.signal, s.value, s.unit, s.ts) for s in got] == [
        ("temp", 21.0, "degC", 100.0),
        ("hum", 26.0, "%", 100.0),
    ]
    assert poller.health.signals["temp"].errors == 1  # the garbage line
    port.write(b"5,10\n")
    got = poller.poll(0.2, 101.0)
    assert [s.value for s in got] == [22.5, 5.0]  # the partial line completed across reads
    assert poller.poll(0.4, 102.0) == []  # nothing new yet
    assert poller.poll(0.7, 103.0) == []
    assert "no data" in poller.health.signals["hum"].last_error


def test_pty_sensor_key_value(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        spec = load_bridge_config(_config(tmp_path, os.ttyname(slave), "kv")).devices[0]
        poller = LinePoller(spec, random.Random(0), 0.0)
        assert poller.poll(0.0, 1.0) == []  # opened, nothing said yet
        os.write(master, b"t=18.25 h=61\r\n")
        import time

        deadline = time.monotonic() + 5
        got = []
        while not got and time.monotonic() < deadline:
            got = poller.poll(poller.due_at(), 2.0)
            time.sleep(0.01)
        assert [(s.signal, s.value) for s in got] == [("temp", 18.25), ("hum", 30.5)]
        assert poller.health.up
        poller.close()
    finally:
        os.close(master)
        os.close(slave)


def test_missing_port_backs_off(tmp_path: Path) -> None:
    spec = load_bridge_config(_config(tmp_path, str(tmp_path / "ttyNOPE"), "csv")).devices[0]
    poller = LinePoller(spec, random.Random(0), 0.0)
    assert poller.poll(0.0, 1.0) == []
    assert not poller.health.up and poller.due_at() > 0.0
    assert "serial port" in poller.health.signals["temp"].last_error
