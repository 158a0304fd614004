"""Latency budget of a round: where the time between two announcements goes, step by step.

Runs bench/bench_rounds.py's fleet (Flower's synthetic task, MLP 24-32-4, FedAvg,
``min_participants = N``: every round waits for all N gateways) with ``[state] trace = true``
in every service, so each writes one timestamp per step to its state folder's trace.jsonl
(fedcore/trace.py). All processes share this machine's clock, so a hop is a receiver's
time minus the sender's. Then, on the same broker with the services stopped, the floor: a
QoS 1 ping-pong of a 4.2 KB payload between a client with a gateway's identity and one with
the aggregator's, on the fleet's own update and model topics (two broker hops: an update
going up and a model coming down), median of 300 after 30 warm-up exchanges.

The budget of round r (rounds 2..R; round 1 includes start-up):

- ``announce hop``: aggregator ``round_published`` to a gateway's transport taking the
  announcement off the socket; ``announce queue + verify``: from there to
  ``announcement_received`` (queued for the service thread, signature checked, decoded)
- ``to train start``: to ``train_start`` (data snapshot, scaling); ``training``: to
  ``train_end`` (not overhead); ``encode + sign + send``: to ``update_published``
- ``update hop``: ``update_published`` to the aggregator's transport; ``update queue +
  verify``: to ``update_received``. Only the last update of a round is on the critical path:
  its figures are listed apart.
- ``fuse``: last ``update_received`` to ``fused`` (validation, fusion, server optimizer, the
  round summary); ``checkpoint``: to ``checkpoint_saved``; ``model encode + sign + send``: to
  ``model_published``; ``next announcement``: to the next ``round_published``
- ``model hop``: ``model_published`` to a gateway's transport; ``model queue + verify``: to
  ``model_received``; ``install``: to ``model_installed``; ``evaluate``: to ``evaluated``.

``period`` = ``round_published`` of round r to that of r + 1; ``overhead`` = period minus the
slowest gateway's training (what bench_rounds.py's figure measures, here on the full cycle).
Every figure is a distribution over rounds (and gateways): median, p90, max in ms.

Usage: python bench/bench_latency.py --gateways 10 50 200 --rounds 12 [--secure]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rounds import FLEET, TASK, run_one  # noqa: E402

from fedcore.protocol.topics import Topics  # noqa: E402
from fedcore.transport.base import Connected, MessageReceived  # noqa: E402
from fedcore.transport.paho import PahoTransport  # noqa: E402
from fedcore.transport.tls import TlsSettings  # noqa: E402

HERE = Path(__file__).resolve().parent
PAYLOAD = 4200  # about a signed fp32 update of the 932-parameter model


def floor_ms(url: str, fleet_dir: Path | None, exchanges: int = 300, warmup: int = 30) -> dict[str, float]:
    """Median and p90 of a two-hop QoS 1 exchange (gateway -> aggregator -> gateway)."""
    topics = Topics(FLEET, TASK)
    device = "gw-floor" if fleet_dir is None else sorted(p.name for p in (fleet_dir / "devices").iterdir())[0]

    def tls(bundle: str) -> TlsSettings | None:
        if fleet_dir is None:
            return None
        d = fleet_dir / bundle
        return TlsSettings(d / "ca.crt", d / "client.crt", d / "client.key")

    got: queue.Queue[float] = queue.Queue()
    ready: queue.Queue[str] = queue.Queue()
    gw = PahoTransport(url, f"{device}-floor", clean_start=True, tls=tls(f"devices/{device}"),
                       rng=random.Random(1))
    agg = PahoTransport(url, "aggregator-floor", clean_start=True, tls=tls("aggregator"),
                        rng=random.Random(2))

    def on_gw(event: Any) -> None:
        if isinstance(event, Connected):
            gw.subscribe(topics.model(), qos=1)
            ready.put("gw")
        elif isinstance(event, MessageReceived) and not event.retained:
            got.put(time.perf_counter())

    def on_agg(event: Any) -> None:
        if isinstance(event, Connected):
            agg.subscribe(topics.updates_filter(), qos=1)
            ready.put("agg")
        elif isinstance(event, MessageReceived) and not event.retained:
            agg.publish(topics.model(), event.payload, qos=1)

    agg.start(on_agg)
    gw.start(on_gw)
    try:
        for _ in range(2):
            ready.get(timeout=30)
        time.sleep(0.5)  # both subscriptions acknowledged
        body = os.urandom(PAYLOAD)
        samples = []
        for i in range(warmup + exchanges):
            t0 = time.perf_counter()
            gw.publish(topics.update(device), body, qos=1)
            t1 = got.get(timeout=10)
            if i >= warmup:
                samples.append((t1 - t0) * 1000)
        samples.sort()
        return {"median": statistics.median(samples), "p90": samples[int(0.9 * len(samples))],
                "min": samples[0]}
    finally:
        gw.stop()
        agg.stop()


def read_traces(workdir: Path) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    agg = [json.loads(line) for line in (workdir / "aggregator-state" / "trace.jsonl").read_text().splitlines()]
    gws = {}
    for path in sorted(workdir.glob("edge-*/trace.jsonl")):
        gws[path.parent.name.removeprefix("edge-")] = [json.loads(line) for line in path.read_text().splitlines()]
    return agg, gws


def budget(agg: list[dict[str, Any]], gws: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Step durations in ms, per round 2..R (and per gateway for the gateway steps)."""
    announced: dict[int, float] = {}
    updates: dict[int, list[dict[str, Any]]] = defaultdict(list)
    fused: dict[int, float] = {}
    saved: dict[int, float] = {}  # round -> its checkpoint after fusion
    published: dict[int, float] = {}  # model version -> time
    version_of: dict[int, int] = {}  # round -> the model version its fusion made
    after_fusion: int | None = None  # the round whose checkpoint and model come next
    for e in agg:
        step = e["step"]
        if step == "round_published" and e.get("purpose", "train") == "train":
            announced.setdefault(e["round"], e["t"])
        elif step == "update_received":
            updates[e["round"]].append(e)
        elif step == "fused":
            fused[e["round"]] = e["t"]
            after_fusion = e["round"]
        elif step == "checkpoint_saved" and after_fusion is not None:
            saved.setdefault(after_fusion, e["t"])
        elif step == "model_published" and after_fusion is not None:
            published.setdefault(e["version"], e["t"])
            version_of.setdefault(after_fusion, e["version"])
            after_fusion = None
    rounds = [r for r in sorted(fused) if r >= 2 and r + 1 in announced and r in version_of and r in saved]
    out: dict[str, list[float]] = defaultdict(list)
    ms = 1000.0
    per_gw: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for device, events in gws.items():
        by: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        for e in events:
            key = e.get("round", e.get("version"))
            by[e["step"]].setdefault(key, e)
        per_gw[device] = by
    for r in rounds:
        v = version_of[r]
        period = announced[r + 1] - announced[r]
        train_max = 0.0
        for by in per_gw.values():
            ann, start, end, sent = (by["announcement_received"].get(r), by["train_start"].get(r),
                                     by["train_end"].get(r), by["update_published"].get(r))
            if ann and start and end and sent:
                out["announce hop"].append((ann["arrived"] - announced[r]) * ms)
                out["announce queue + verify"].append((ann["t"] - ann["arrived"]) * ms)
                out["to train start"].append((start["t"] - ann["t"]) * ms)
                out["training"].append((end["t"] - start["t"]) * ms)
                out["encode + sign + send"].append((sent["t"] - end["t"]) * ms)
                train_max = max(train_max, end["t"] - start["t"])
            got, inst, ev = by["model_received"].get(v), by["model_installed"].get(v), by["evaluated"].get(v)
            if got and inst and ev:
                out["model hop"].append((got["arrived"] - published[v]) * ms)
                out["model queue + verify"].append((got["t"] - got["arrived"]) * ms)
                out["install"].append((inst["t"] - got["t"]) * ms)
                out["evaluate"].append((ev["t"] - inst["t"]) * ms)
        sent_at = {d: by["update_published"][r]["t"] for d, by in per_gw.items() if r in by["update_published"]}
        for u in updates[r]:
            if u["device"] in sent_at:
                out["update hop"].append((u["arrived"] - sent_at[u["device"]]) * ms)
                out["update queue + verify"].append((u["t"] - u["arrived"]) * ms)
        last = max(updates[r], key=lambda u: u["t"])
        if last["device"] in sent_at:
            out["last update: hop"].append((last["arrived"] - sent_at[last["device"]]) * ms)
            out["last update: queue + verify"].append((last["t"] - last["arrived"]) * ms)
        out["first to last update in"].append((last["t"] - min(u["t"] for u in updates[r])) * ms)
        out["fuse"].append((fused[r] - last["t"]) * ms)
        out["checkpoint"].append((saved[r] - fused[r]) * ms)
        out["model encode + sign + send"].append((published[v] - saved[r]) * ms)
        out["next announcement"].append((announced[r + 1] - published[v]) * ms)
        out["period"].append(period * ms)
        out["overhead"].append((period - train_max) * ms)
    return dict(out)


def dist(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "max": s[-1],
            "n": len(s)}


ORDER = ("announce hop", "announce queue + verify", "to train start", "training",
         "encode + sign + send", "update hop", "update queue + verify", "first to last update in",
         "last update: hop", "last update: queue + verify", "fuse", "checkpoint",
         "model encode + sign + send", "next announcement", "model hop", "model queue + verify",
         "install", "evaluate", "period", "overhead")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gateways", type=int, nargs="+", default=[10])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--secure", action="store_true", help="provisioned mTLS fleet, signed messages")
    ap.add_argument("--start-concurrency", type=int, default=4)
    ap.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ for the gateways (as bench_rounds.py; 0 = unset): "
                         "the data set's transient arrays go back to the OS, so 200 fit in memory")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per N, seconds")
    ap.add_argument("--results", default=str(HERE / "RESULTS_latency.md"))
    ap.add_argument("--json", default="", help="also write the raw figures here")
    args = ap.parse_args(argv)
    command = "python bench/bench_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = os.getloadavg()[0]
    results = []
    for n in args.gateways:
        with tempfile.TemporaryDirectory(prefix=f"fedgate-latency-{n}-") as tmp:
            workdir = Path(tmp)
            env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else None
            run = run_one(n, args.rounds, workdir, args.start_concurrency, args.timeout, print,
                          edge_env=env, secure=args.secure, trace=True, after_run=floor_ms)
            if run.error:
                print(f"N={n}: {run.error}", file=sys.stderr)
                results.append({"n": n, "error": run.error})
                continue
            steps = budget(*read_traces(workdir))
            figures = {name: dist(steps[name]) for name in ORDER if steps.get(name)}
            floor = run.after
            overhead = figures["overhead"]["median"]
            cpu = {k: v * 1000 for k, v in run.cpu.items()}
            results.append({"n": n, "secure": args.secure, "floor_ms": floor, "steps": figures,
                            "overhead_over_floor": overhead / floor["median"], "cpu_ms": cpu})
            print(f"N={n}: overhead median {overhead:.1f} ms, floor {floor['median']:.2f} ms "
                  f"({overhead / floor['median']:.1f}x)")
    text = section(command, args, results, load_start)
    print(text)
    with open(args.results, "a", encoding="utf-8") as out:
        out.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results) else 1


def section(command: str, args: argparse.Namespace, results: list[dict[str, Any]], load_start: float) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    lines = [f"\n## {when} - `{command}`\n",
             f"Machine: {os.cpu_count()} CPUs, CPython {platform.python_version()}, "
             f"{platform.system()} {platform.release()}; 1-min load average {load_start:.1f} at "
             f"start, {os.getloadavg()[0]:.1f} at the end. {'mTLS + signed messages' if args.secure else 'Plain MQTT, unsigned'}; "
             f"rounds 2..{args.rounds} (round 1 includes start-up).\n"]
    for r in results:
        if "error" in r:
            lines.append(f"- N = {r['n']}: {r['error']}\n")
            continue
        f = r["floor_ms"]
        lines.append(f"\n### N = {r['n']}: overhead {r['steps']['overhead']['median']:.1f} ms = "
                     f"{r['overhead_over_floor']:.1f}x the floor ({f['median']:.2f} ms median, "
                     f"p90 {f['p90']:.2f}, min {f['min']:.2f}: two-hop QoS 1 exchange, 4.2 KB)\n")
        cpu = r["cpu_ms"]
        if cpu:
            total = sum(cpu.values())
            lines.append(f"CPU per round: aggregator {cpu['aggregator']:.1f} ms, broker "
                         f"{cpu['broker']:.1f} ms, gateways {cpu['gateways']:.1f} ms in all "
                         f"({cpu['gateways'] / r['n']:.2f} ms each); {total:.1f} ms on "
                         f"{os.cpu_count()} cores = at least {total / (os.cpu_count() or 1):.1f} ms "
                         "of every period when all run on this machine.\n")
        lines.append("| step | median ms | p90 ms | max ms | samples |\n|---|---|---|---|---|")
        for name, d in r["steps"].items():
            lines.append(f"| {name} | {d['median']:.2f} | {d['p90']:.2f} | {d['max']:.2f} | {d['n']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
