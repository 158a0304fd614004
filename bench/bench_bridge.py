"""Bridge throughput: samples/s per device and in total for 1, 10, 50 simulated turbines.

The simulated plant runs in a child process (one asyncio loop serving every turbine on its
own port); the bridge is the real service (`python -m fedgate bridge run -c ...`) in another
child process writing a real sample store; CPU and RSS are read from its /proc entry over a
steady-state window (after 1 s of start-up), and samples/s is what reached the store in
that window. Each device has the 9-signal wind turbine map (one Modbus request per poll). Two regimes:

- ``max``: poll period 1 ms, i.e. as fast as request round trips allow;
- ``1 Hz``: every signal once a second, a realistic SCADA rate, to show the idle cost.

Usage: python bench/bench_bridge.py [--devices 1 10 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firmware_bridge.simulator import (
    UNITS,
    SimulatedDevice,
    SimulatedTurbine,
    SimulatorServer,
    wind_bridge_toml,
)


def serve(n: int, base_port: int) -> None:
    server = SimulatorServer()
    for i in range(n):
        server.add(SimulatedTurbine(UNITS[i % len(UNITS)], speed=6000.0), base_port + i)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.close()


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds used, RSS in MB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


def run(n: int, period: float, seconds: float, base_port: int) -> dict[str, float]:
    sim = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(n), "--base-port", str(base_port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sim.stdout is not None and sim.stdout.readline().strip() == "ready"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            devices = [SimulatedDevice(f"t{i}", base_port + i) for i in range(n)]
            cfg = Path(tmp) / "bridge.toml"
            cfg.write_text(wind_bridge_toml(devices, Path(tmp) / "s.db", period=period))
            # The real service, as systemd starts it.
            bridge = subprocess.Popen(
                [sys.executable, "-m", "fedgate", "bridge", "run", "-c", str(cfg)]
            )
            time.sleep(1.0)  # imports and first connections are not the steady state
            cpu0, _ = proc_stats(bridge.pid)
            t0 = time.time()
            time.sleep(seconds)
            cpu1, rss = proc_stats(bridge.pid)
            t1 = time.time()
            bridge.send_signal(signal.SIGTERM)
            bridge.wait(timeout=30)
            conn = sqlite3.connect(Path(tmp) / "s.db")
            written = conn.execute(
                "SELECT count(*) FROM samples WHERE ts >= ? AND ts < ?", (t0, t1)
            ).fetchone()[0]
            conn.close()
    finally:
        assert sim.stdin is not None
        sim.stdin.close()
        sim.wait(timeout=30)
    wall = t1 - t0
    total = written / wall
    return {
        "total": total,
        "per_device": total / n,
        "cpu": 100.0 * (cpu1 - cpu0) / wall,
        "rss": rss,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--base-port", type=int, default=25020)
    ap.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.base_port)
        return
    print(
        "| devices | poll period | samples/s total | samples/s per device | bridge CPU (% of one core) | bridge RSS MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for period in (0.001, 1.0):
        for n in args.devices:
            r = run(n, period, args.seconds, args.base_port)
            label = "1 ms (max)" if period < 0.01 else "1 s"
            print(
                f"| {n} | {label} | {r['total']:.0f} | {r['per_device']:.0f} | {r['cpu']:.0f} | {r['rss']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
