"""Soak: thousands of rounds back to back, state on disk and memory watched.

The aggregator and ``--gateways`` gateways (synthetic data, LiteRT inference on, so every
round exports and writes a .tflite) run as separate processes on a private Mosquitto on
loopback, with ``rounds = --rounds`` and the default retention (50 model files, 1,000 round
summaries in history.jsonl, 3 .tflite files per gateway). Every ``--sample`` seconds the
bench records the round, the RSS of each process (/proc), the sizes of the aggregator's
checkpoint and history journal and the number of model and .tflite files. Growth is judged after a warm-up of a fifth of
the run.

Usage: python bench/bench_soak.py [--rounds 3000] [--gateways 2] [--out bench/soak.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedgate.broker import free_port, start_broker
from fedgate.demo_configs import DemoOptions, write_configs
from fedgate.processes import ProcessGroup, fedgate_argv, wait_for


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--sample", type=float, default=5.0)
    parser.add_argument("--out", default="bench/soak.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedgate-soak-"))
    broker = start_broker(prefer="mosquitto", data_dir=work / "broker", fallback=False)
    samples: list[dict[str, Any]] = []
    try:
        dataset = load_dataset("synthetic", gateways=args.gateways, max_rows_per_unit=200)
        options = DemoOptions(dataset="synthetic", gateways=args.gateways, rounds=args.rounds,
                              fleet="soak", task="soak", inference=True)
        files = write_configs(work, broker.url, options, dataset, default_spec(dataset),
                              default_train_config(dataset))
        port = free_port()
        files.aggregator.write_text(files.aggregator.read_text().replace(
            "[state]\n", f"[state]\nmetrics_port = {port}\n"))
        state = work / "aggregator-state"
        with ProcessGroup(work / "logs") as group:
            for name, path in files.edges.items():
                group.start(f"edge-{name}", fedgate_argv("edge", "run", "-c", str(path)))
            group.start("aggregator", fedgate_argv("aggregator", "run", "-c", str(files.aggregator)))
            started = time.monotonic()
            while True:
                values = scrape(port)
                done = values.get('fedgate_phase{phase="finished"}') == 1
                sample = {
                    "t": time.monotonic() - started, "round": values.get("fedgate_round", 0),
                    "rss_mb": {n: rss_mb(c.proc.pid) for n, c in group.children.items() if c.running},
                    "checkpoint_kb": (state / "checkpoint.npz").stat().st_size / 1024
                    if (state / "checkpoint.npz").exists() else 0,
                    "journal_kb": (state / "history.jsonl").stat().st_size / 1024
                    if (state / "history.jsonl").exists() else 0,
                    "model_files": len(list((state / "models").glob("v*.npz"))),
                    "tflite_files": {n: len(list((work / f"edge-gw-{n}" / "models").glob("*.tflite")))
                                     for n in files.edges},
                }
                samples.append(sample)
                print(f"{sample['t']:7.0f} s round {sample['round']:6.0f}  "
                      + "  ".join(f"{n} {v:.1f} MB" for n, v in sample["rss_mb"].items())
                      + f"  checkpoint {sample['checkpoint_kb']:.0f} kB, history {sample['journal_kb']:.0f} kB, "
                      + f"{sample['model_files']} models",
                      flush=True)
                if done:
                    break
                if group.died():
                    raise RuntimeError(group.logs_text())
                time.sleep(args.sample)
            wait_for("nothing", lambda: True, 1)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    record = {"args": vars(args), "samples": samples, "summary": summarize(samples)}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(record["summary"], indent=1))
    return 0


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    warm = samples[len(samples) // 5:]
    out: dict[str, Any] = {"rounds": samples[-1]["round"], "seconds": samples[-1]["t"]}
    for name in warm[0]["rss_mb"]:
        series = [s["rss_mb"][name] for s in warm if name in s["rss_mb"]]
        out[f"{name}_rss_mb"] = {"after_warmup": series[0], "end": series[-1], "max": max(series),
                                 "growth_pct": 100 * (series[-1] - series[0]) / series[0]}
    out["checkpoint_kb_end"] = samples[-1]["checkpoint_kb"]
    out["checkpoint_kb_max"] = max(s["checkpoint_kb"] for s in samples)
    out["journal_kb_max"] = max(s.get("journal_kb", 0) for s in samples)
    out["model_files_max"] = max(s["model_files"] for s in samples)
    out["tflite_files_max"] = max(max(s["tflite_files"].values(), default=0) for s in samples)
    return out


if __name__ == "__main__":
    sys.exit(main())
