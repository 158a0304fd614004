"""A plant that learns for days of plant time: rows arriving, rounds scheduled, memory watched.

Real processes on loopback: Mosquitto, one simulated turbine per gateway replaying the La
Haute Borne SCADA rows at ``--speed`` times real time (`fedgate bridge simulate`), one
bridge per turbine filling its sample store, one store-fed gateway per store and the
aggregator with a schedule (a round at most every ``--interval`` seconds, and only once the
gateways hold ``--min-new-rows`` rows no round used). Every ``--sample`` seconds the bench
reads the gateways' and the aggregator's RSS from /proc and the task state from the broker
(`fedgate status --json`); at the end it writes one JSON record (rounds: rows trained, the
fleet's holdout RMSE in kW; RSS over time) and prints a summary.

Plant time is the turbines' own clock (row_time): at ``--speed 1200`` one 10-minute SCADA
row arrives every half second, so 30 minutes of wall time is 25 days of plant time.

Usage: python bench/bench_plant.py [--gateways 2] [--minutes 30] [--speed 1200]
       [--interval 60] [--out bench/plant.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedgate.processes import ProcessGroup, fedgate_argv, wait_for

UNITS = ("R80711", "R80721", "R80736", "R80790")
FEATURES = '["Ws_avg", "sin(Wa_avg)", "cos(Wa_avg)", "Ot_avg", "Va_avg"]'
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def edge_toml(i: int, unit: str, url: str, work: Path, holdout_block_s: int) -> str:
    return f"""
[device]
id = "gw-{i}"
fleet = "bench"
task = "plant"
[broker]
url = "{url}"
[data]
source = "store"
store = "{work}/store-{i}.db"
device = "turbine"
task = "regression"
features = {FEATURES}
target = "P_avg"
time_signal = "row_time"
record_signal = "row_seq"
exclude_when = ["P_avg <= 0 and Ws_avg > 4"]
holdout_every = 5
holdout_block_s = {holdout_block_s}
min_rows = 300
[data.valid]
Ot_avg = [-40, 50]
Ws_avg = [0, 40]
P_avg = [-100, 2255]
Va_avg = [-180, 180]
[state]
dir = "{work}/edge-{i}"
"""


def aggregator_toml(url: str, work: Path, args: argparse.Namespace) -> str:
    return f"""
[task]
fleet = "bench"
name = "plant"
[broker]
url = "{url}"
[model]
layer_sizes = [5, 32, 16, 1]
features = {FEATURES}
target = "P_avg"
[rounds]
rounds = 0
min_participants = {args.gateways}
round_timeout_s = 120
[schedule]
interval_s = {args.interval}
min_new_rows = {args.min_new_rows}
[train]
batch_size = 64
learning_rate = 0.003
optimizer = "adam"
max_steps = 500
[state]
dir = "{work}/aggregator"
"""


def status(url: str) -> dict[str, Any]:
    out = subprocess.run(fedgate_argv("status", "--broker", url, "--fleet", "bench", "--json"),
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--speed", type=float, default=1200.0)
    parser.add_argument("--interval", type=float, default=60.0)
    parser.add_argument("--min-new-rows", type=int, default=100)
    parser.add_argument("--holdout-block-s", type=int, default=86400)
    parser.add_argument("--sample", type=float, default=10.0)
    parser.add_argument("--out", default="bench/plant.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedgate-plant-"))
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    samples: list[dict[str, Any]] = []
    started = time.time()
    try:
        with ProcessGroup(work / "logs") as group:
            group.start("mosquitto", ["mosquitto", "-p", str(port)])
            for i in range(1, args.gateways + 1):
                sim_port = free_port()
                group.start(f"turbine-{i}", fedgate_argv("bridge", "simulate", "--unit", UNITS[i - 1],
                                                         "--port", str(sim_port), "--speed", str(args.speed)))
                bridge = (REPO / "firmware_bridge/maps/wind_turbine.toml").read_text()
                bridge = bridge.replace('store = "samples.db"', f'store = "{work}/store-{i}.db"')
                bridge = bridge.replace("port = 5020", f"port = {sim_port}").replace(
                    "period = 1.0", f"period = {600.0 / args.speed / 2:.4f}")
                (work / f"bridge-{i}.toml").write_text(bridge)
                (work / f"edge-{i}.toml").write_text(edge_toml(i, UNITS[i - 1], url, work, args.holdout_block_s))
                wait_for("the turbine", lambda p=sim_port: _listening(p), 30)
                group.start(f"bridge-{i}", fedgate_argv("bridge", "run", "-c", str(work / f"bridge-{i}.toml")))
                group.start(f"edge-{i}", fedgate_argv("edge", "run", "-c", str(work / f"edge-{i}.toml")))
            (work / "aggregator.toml").write_text(aggregator_toml(url, work, args))
            group.start("aggregator", fedgate_argv("aggregator", "run", "-c", str(work / "aggregator.toml")))
            end = started + args.minutes * 60
            while time.time() < end:
                if group.died():
                    raise RuntimeError(f"a service exited:\n{group.logs_text()}")
                samples.append({
                    "t": time.time() - started,
                    "rss_mb": {n: rss_mb(c.proc.pid) for n, c in group.children.items()
                               if n.startswith(("edge", "aggregator", "bridge"))},
                })
                print(f"{samples[-1]['t']:7.0f} s  " + "  ".join(
                    f"{n} {v:.1f}" for n, v in samples[-1]["rss_mb"].items()), flush=True)
                time.sleep(args.sample)
            final = status(url)
            rss_end = {n: rss_mb(c.proc.pid) for n, c in group.children.items()}
            logs = {n: c.output() for n, c in group.children.items() if n.startswith("edge")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record = {"args": vars(args), "samples": samples, "final": final, "rss_end": rss_end,
              "rows_per_gateway_log": {n: _trained(log) for n, log in logs.items()}}
    Path(args.out).write_text(json.dumps(record, indent=1))
    summarize(record)
    return 0


def _trained(log: str) -> list[int]:
    import re

    return [int(m) for m in re.findall(r"trained on version \d+ with (\d+) rows", log)]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def summarize(record: dict[str, Any]) -> None:
    task = (record["final"].get("tasks") or [{}])[0]
    history = task.get("history", [])
    print(f"{len(history)} rounds; lineage {task.get('lineage')}")
    for h in history:
        metric = f"{h['metric']:.1f}" if h["metric"] is not None else "-"
        print(f"round {h['round']:4d}  rows {h['rows']:7d}  rmse(kW, models it trained from) {metric:>8}")
    for name in sorted(record["samples"][0]["rss_mb"]) if record["samples"] else []:
        series = [s["rss_mb"][name] for s in record["samples"] if name in s["rss_mb"]]
        warm = series[len(series) // 5:] or series
        print(f"{name}: RSS {series[0]:.1f} MB at start, {min(warm):.1f}-{max(warm):.1f} MB after warm-up, "
              f"{series[-1]:.1f} MB at the end")


if __name__ == "__main__":
    sys.exit(main())
    os.environ  # noqa: B018
