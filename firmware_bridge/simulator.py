"""A simulated plant: wind turbines of the real La Haute Borne data set as Modbus TCP devices.

Theory of operation
-------------------
:class:`SimulatedTurbine` holds one turbine's SCADA series (10-minute rows of
``Ba_avg, P_avg, Ws_avg, Va_avg, Ot_avg, Ya_avg, Wa_avg`` plus the row's Unix time) and
answers every read with the registers of the *current* row and its record number
(``row_seq``, +1 per row, never wrapping), encoded exactly as the register
map ``maps/wind_turbine.toml`` says (the map is the single source of truth for both sides).
The current row advances in one of two ways:

- ``advance="time"``: replay at ``speed`` times real time (speed 600 = one 10-minute row
  per second), as a real turbine would move on whether anyone reads or not;
- ``advance="read"``: one row per read of the block holding ``row_time`` (lockstep), so a
  bridge sees every row exactly once whatever the machine load — what a reproducible demo
  or test wants.

The series wraps around at its end. Faults can be injected at run time for tests and demos:
never answer (the client times out) or answer every read with a Modbus exception code;
stopping and restarting the server makes the device disappear and come back.

:class:`SimulatorServer` runs any number of turbines, each on its own TCP port, on one
asyncio loop in a background thread (the pymodbus server is asyncio). ``spawn_simulator``
starts one as a subprocess instead.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from firmware_bridge.config import BridgeConfig, SignalSpec, load_bridge_config
from firmware_bridge.registers import encode_raw, raw_from_engineering

WIND_MAP = Path(__file__).parent / "maps" / "wind_turbine.toml"
UNITS = ("R80711", "R80721", "R80736", "R80790")
ROW_SECONDS = 600.0  # the SCADA rows are 10-minute averages
WIND_COLUMNS = ("Ba_avg", "P_avg", "Ws_avg", "Va_avg", "Ot_avg", "Ya_avg", "Wa_avg")
TIME_SIGNAL = "row_time"
SEQ_SIGNAL = "row_seq"


def wind_data_path() -> Path:
    import fedcore.datasets

    return Path(fedcore.datasets.__file__).parent / "data" / "la_haute_borne.npz"


def wind_signals() -> tuple[SignalSpec, ...]:
    """The signals of the simulator's register map (row_time, WIND_COLUMNS, row_seq)."""
    return load_bridge_config(WIND_MAP).devices[0].signals


class Fault(enum.Enum):
    NONE = "none"
    TIMEOUT = "timeout"  # accept the request, never answer
    EXCEPTION = "exception"  # answer with a Modbus exception code


class SimulatedTurbine:
    """Registers of one turbine; ``clock`` is monotonic seconds (passed in for tests)."""

    def __init__(
        self,
        unit: str,
        speed: float = 600.0,
        advance: str = "time",
        start_row: int = 0,
        clock: Callable[[], float] = time.monotonic,
        data_path: Path | None = None,
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"unknown unit {unit!r}; one of {', '.join(UNITS)}")
        if advance not in ("time", "read"):
            raise ValueError("advance must be 'time' or 'read'")
        with np.load(data_path or wind_data_path()) as data:
            columns = [str(c) for c in data["columns"]]
            self.times = np.asarray(data[f"{unit}_time"], dtype=np.int64)
            self.values = np.asarray(data[f"{unit}_values"], dtype=np.float32)
        self.unit = unit
        self.signals = wind_signals()
        self.col_of = {
            s.name: columns.index(s.name)
            for s in self.signals
            if s.name not in (TIME_SIGNAL, SEQ_SIGNAL)
        }
        self.size = max(s.encoding.end for s in self.signals if s.encoding)
        self.speed = speed
        self.advance = advance
        self.start_row = start_row
        self.clock = clock
        self.t0 = clock()
        self.reads = 0
        self.fault = Fault.NONE
        self.fault_code = 4
        self.release = asyncio.Event()

    def record(self) -> int:
        """Number of the record on the registers: rows replayed since row 0 (never wraps)."""
        if self.advance == "read":
            step = self.reads
        else:
            step = int((self.clock() - self.t0) * self.speed / ROW_SECONDS)
        return self.start_row + step

    def registers_for(self, record: int) -> list[int]:
        regs = [0] * self.size
        row = record % len(self.times)  # the series wraps around; the record number does not
        for sig in self.signals:
            enc = sig.encoding
            assert enc is not None
            if sig.name == TIME_SIGNAL:
                value = float(self.times[row])
            elif sig.name == SEQ_SIGNAL:
                value = float(record % 2**32)
            else:
                value = float(self.values[row, self.col_of[sig.name]])
            regs[enc.address : enc.end] = encode_raw(
                raw_from_engineering(value, enc), enc.dtype, enc.order
            )
        return regs

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> object:
        """pymodbus SimDevice hook: runs before each request is answered."""
        from pymodbus.constants import ExcCodes

        if self.fault is Fault.TIMEOUT:
            # Hold this request (the client gives up); released when the fault clears.
            try:
                await asyncio.wait_for(self.release.wait(), timeout=30.0)
            except TimeoutError:
                pass
            return ExcCodes.DEVICE_BUSY
        if self.fault is Fault.EXCEPTION:
            return ExcCodes(self.fault_code)
        if address <= 0 < address + count:  # the block holding row_time: next record
            registers[0 : self.size] = self.registers_for(self.record())
            self.reads += 1
        return None

    def set_fault(self, fault: Fault, code: int = 4) -> None:
        self.fault, self.fault_code = fault, code
        if fault is Fault.NONE:
            self.release.set()
            self.release = asyncio.Event()


class SimulatorServer:
    """Serves turbines on 127.0.0.1 ports from one background asyncio loop."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="modbus-sim", daemon=True)
        self.thread.start()
        self.servers: dict[int, object] = {}
        self.turbines: dict[int, SimulatedTurbine] = {}
        self.serial_servers: list[object] = []
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # injected faults are not news

    def add(self, turbine: SimulatedTurbine, port: int, device_id: int = 1) -> int:
        """Serve ``turbine`` on ``port`` (0 = any free port); returns the port."""
        self.turbines[port] = turbine
        return self._call(self._listen(turbine, port, device_id))

    async def _listen(self, turbine: SimulatedTurbine, port: int, device_id: int) -> int:
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        turbine.release = asyncio.Event()  # bind the event to this loop
        device = SimDevice(
            id=device_id,
            simdata=[SimData(0, count=turbine.size, values=0, datatype=DataType.REGISTERS)],
            action=turbine.action,  # type: ignore[arg-type]
        )
        server = ModbusTcpServer(device, address=(self.host, port))
        await server.serve_forever(background=True)
        sockets = getattr(server.transport, "sockets", None)
        real = int(sockets[0].getsockname()[1]) if sockets else port
        self.servers[real] = server
        self.turbines[real] = turbine
        return real

    def add_rtu(
        self, turbines: dict[int, SimulatedTurbine], serial_port: str, baudrate: int = 19200
    ) -> None:
        """Serve ``turbines`` by unit id on one RS-485 line (Modbus RTU on ``serial_port``)."""
        self._call(self._listen_rtu(turbines, serial_port, baudrate))

    async def _listen_rtu(
        self, turbines: dict[int, SimulatedTurbine], serial_port: str, baudrate: int
    ) -> int:
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        devices = []
        for unit_id, turbine in turbines.items():
            turbine.release = asyncio.Event()
            devices.append(
                SimDevice(
                    id=unit_id,
                    simdata=[SimData(0, count=turbine.size, values=0, datatype=DataType.REGISTERS)],
                    action=turbine.action,  # type: ignore[arg-type]
                )
            )
        server = ModbusSerialServer(
            devices, port=serial_port, baudrate=baudrate, ignore_missing_devices=True
        )
        await server.serve_forever(background=True)
        self.serial_servers.append(server)
        return 0

    def remove(self, port: int) -> SimulatedTurbine:
        """Stop serving ``port`` (the device disappears); ``add`` it again to bring it back."""
        server = self.servers.pop(port)
        self._call(server.shutdown())  # type: ignore[attr-defined]
        return self.turbines.pop(port)

    def set_fault(self, port: int, fault: Fault, code: int = 4) -> None:
        turbine = self.turbines[port]
        self.loop.call_soon_threadsafe(turbine.set_fault, fault, code)

    def _call(self, coro: object) -> int:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)  # type: ignore[arg-type]

    def close(self) -> None:
        for port in list(self.servers):
            self.remove(port)
        for server in self.serial_servers:
            self._call(server.shutdown())  # type: ignore[attr-defined]
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


def start_simulator(
    unit: str, port: int = 0, speed: float = 600.0, advance: str = "time", start_row: int = 0
) -> tuple[SimulatorServer, int]:
    """One simulated turbine in this process; returns the server (``close()`` it) and port."""
    server = SimulatorServer()
    real = server.add(SimulatedTurbine(unit, speed, advance, start_row), port)
    return server, real


def spawn_simulator(
    unit: str, port: int, speed: float = 600.0, advance: str = "time", start_row: int = 0
) -> subprocess.Popen[bytes]:
    """One simulated turbine as a child process; returns once it accepts connections."""
    import socket

    cmd = [
        sys.executable,
        "-m",
        "firmware_bridge.simulator",
        "--unit",
        unit,
        "--port",
        str(port),
        "--speed",
        str(speed),
        "--advance",
        advance,
        "--start-row",
        str(start_row),
    ]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"simulator exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"simulator did not listen on port {port}")


@dataclass(frozen=True, slots=True)
class SimulatedDevice:
    name: str
    port: int
    host: str = "127.0.0.1"
    unit_id: int = 1


def wind_bridge_toml(
    devices: Sequence[SimulatedDevice], store: str | Path, period: float = 1.0, timeout: float = 1.0
) -> str:
    """A bridge config (TOML text) reading ``devices`` with the simulator's register map."""
    head = WIND_MAP.read_text().split("[[device]]", 1)[0]
    head = head.replace('store = "samples.db"', f"store = {json.dumps(str(store))}")
    signals = WIND_MAP.read_text().split("[[device.signal]]", 1)[1]
    out = [head]
    for dev in devices:
        out.append(
            f'[[device]]\nname = "{dev.name}"\nprotocol = "modbus_tcp"\nhost = "{dev.host}"\n'
            f"port = {dev.port}\nunit_id = {dev.unit_id}\ntimeout = {timeout}\nretries = 1\n"
            f"backoff_initial = 0.2\nbackoff_max = 5.0\nperiod = {period}\n\n"
            f"[[device.signal]]{signals}\n"
        )
    return "".join(out)


def wind_bridge_config(
    devices: Sequence[SimulatedDevice],
    store: str | Path,
    period: float = 1.0,
    folder: Path | None = None,
    timeout: float = 1.0,
) -> BridgeConfig:
    """Write and load a bridge config for ``devices`` (file kept in ``folder`` for operators)."""
    import tempfile

    where = folder or Path(tempfile.mkdtemp(prefix="fedgate-bridge-"))
    path = where / "bridge.toml"
    path.write_text(wind_bridge_toml(devices, Path(store).resolve(), period, timeout))
    return load_bridge_config(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="firmware_bridge.simulator")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unit", required=True, choices=UNITS, help="turbine of La Haute Borne")
    parser.add_argument(
        "--port", type=int, default=5020, help="TCP port on 127.0.0.1 (default 5020)"
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=600.0,
        help="times real time (600 = one 10-min row per second)",
    )
    parser.add_argument(
        "--advance",
        choices=("time", "read"),
        default="time",
        help="next row by clock or on each read",
    )
    parser.add_argument("--start-row", type=int, default=0, help="first row replayed")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")


def run_from_args(args: argparse.Namespace) -> int:
    server = SimulatorServer(args.host)
    port = server.add(
        SimulatedTurbine(args.unit, args.speed, args.advance, args.start_row), args.port
    )
    print(f"simulating {args.unit} on {args.host}:{port} (map {WIND_MAP})", flush=True)
    try:
        while server.thread.is_alive():
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
