"""Bridge throughput: samples/s per device and in total for 1, 10, 50 simulated turbines.

The simulated plant runs in a child process (one asyncio loop serving every turbine on its
own port); the bridge runs in this process, writing to a real sample store, so the CPU and
RSS figures are the bridge's own. Each device has the 8-signal wind turbine map (one Modbus
request per poll). Two regimes:

- ``max``: poll period 1 ms, i.e. as fast as request round trips allow;
- ``1 Hz``: every signal once a second, a realistic SCADA rate, to show the idle cost.

Usage: python bench/bench_bridge.py [--devices 1 10 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from firmware_bridge.runtime import Bridge
from firmware_bridge.simulator import (
    UNITS,
    SimulatedDevice,
    SimulatedTurbine,
    SimulatorServer,
    wind_bridge_config,
)


def serve(n: int, base_port: int) -> None:
    server = SimulatorServer()
    for i in range(n):
        server.add(SimulatedTurbine(UNITS[i % len(UNITS)], speed=6000.0), base_port + i)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.close()


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
            cfg = wind_bridge_config(devices, Path(tmp) / "s.db", period=period, folder=Path(tmp))
            bridge = Bridge(cfg, seed=0)
            cpu0, t0 = time.process_time(), time.monotonic()
            stats = bridge.run(duration=seconds)
            cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        assert sim.stdin is not None
        sim.stdin.close()
        sim.wait(timeout=30)
    total = stats.written / wall
    return {
        "devices": n,
        "period": period,
        "total": total,
        "per_device": total / n,
        "cpu": 100.0 * cpu / wall,
        "rss": rss_mb(),
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
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
