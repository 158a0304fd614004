"""System benchmark: N gateway processes x R rounds of FedAvg over loopback Mosquitto.

The task is the one a Flower baseline was measured on: synthetic 24-feature, 4-class
Gaussian blobs, 2,000 samples per gateway with Dirichlet(0.5) label skew
(``load_dataset("synthetic", gateways=N)``), MLP 24-32-4 (932 parameters), 1 local epoch,
batch 32, SGD lr 0.1, FedAvg, ``min_participants = N``.

For each N the script starts Mosquitto on a free loopback port, a byte-counting proxy in
front of it (bench/counting_proxy.py), the real aggregator (``fedgate aggregator run``,
connected to the broker directly) and N real gateway agents (``fedgate edge run``,
connected through the proxy) as separate processes, with the same TOML an operator writes
(fedgate.demo_configs). An observer subscribes to the retained metrics and status topics.

- Start-up is staggered: at most ``--start-concurrency`` gateways are starting at once (a
  gateway is starting until its retained "online" status is seen), so 200 Python
  processes on 2 cores neither time out nor all load their data at the same moment. The
  aggregator announces round 1 at once and closes it when all N have sent, so round 1
  includes start-up and is excluded from every steady-state figure.
- Round overhead = ``wall_s - train_s_max`` from each round summary: the round's wall time
  (announcement to commit, measured by the aggregator) minus the slowest gateway's local
  training time. It includes delivery, the gateway's evaluation of the new model, encoding,
  signing, decoding, aggregation, checkpointing and publishing.
- Wire bytes per client per round: MQTT bytes through the proxy (fixed headers,
  properties, acks and pings; not TCP/IP headers). The proxy marks the counters each time
  a gateway finishes sending a PUBLISH; a gateway sends one update per round, so
  (counters at its round-R update - counters at its round-1 update) / (R - 1) is exactly
  its traffic over R - 1 steady-state rounds, both directions.
- RSS: VmHWM (peak) and VmRSS (current) from /proc/PID/status of every gateway process and
  the aggregator, read after the last round, before shutdown.

Every process, the proxy and the broker are stopped at the end, also on error or Ctrl-C.

Usage: python bench/bench_rounds.py --gateways 10 50 200 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from counting_proxy import CountingProxy  # noqa: E402

from fedcore.datasets import default_spec, load_dataset  # noqa: E402
from fedcore.protocol import codec  # noqa: E402
from fedcore.protocol.messages import RoundSummary, Status, TrainConfig  # noqa: E402
from fedcore.protocol.topics import Topics  # noqa: E402
from fedcore.transport.base import Connected, MessageReceived  # noqa: E402
from fedcore.transport.paho import PahoTransport  # noqa: E402
from fedgate.broker import RunningBroker, start_broker  # noqa: E402
from fedgate.demo import observer_tls, start_secure_broker  # noqa: E402
from fedgate.demo_configs import DemoOptions, device_id, write_configs  # noqa: E402

HERE = Path(__file__).resolve().parent
TRAIN = TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.1, optimizer="sgd")
FLEET, TASK = "bench", "rounds"
FLOWER = ("Flower 1.42 deployment engine, quoted from issue 2 (measured earlier on this "
          "machine, NOT re-measured here): ~12 s per round at N = 10; 64 s per round at "
          "N = 50, losing gateways; ~48 KB per client per round; ~134 MB per client process.")


@dataclass
class Run:
    n: int
    rounds: int
    summaries: dict[int, RoundSummary] = field(default_factory=dict)
    online_after_s: float | None = None
    never_online: list[str] = field(default_factory=list)
    edge_mem: dict[str, tuple[int, int]] = field(default_factory=dict)  # (VmHWM, VmRSS) kB
    agg_mem: tuple[int, int] = (0, 0)
    wire: dict[str, tuple[float, float]] = field(default_factory=dict)  # per round (up, down)
    wire_total: dict[str, tuple[int, int]] = field(default_factory=dict)
    update_marks: dict[str, int] = field(default_factory=dict)
    agg_log: dict[str, int] = field(default_factory=dict)
    after: Any = None  # what ``after_run`` returned
    # CPU seconds per steady round (the rounds after round 2): aggregator, broker, gateways
    cpu: dict[str, float] = field(default_factory=dict)
    error: str = ""
    elapsed_s: float = 0.0


def proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_memory(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in kB from /proc/PID/status; (0, 0) if the process is gone."""
    values = {"VmHWM": 0, "VmRSS": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in values:
                values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["VmHWM"], values["VmRSS"]


class Observer:
    """Retained metrics and status, read straight from the broker (not via the proxy)."""

    def __init__(self, url: str, topics: Topics, fleet_dir: Path | None = None) -> None:
        self.topics = topics
        self.events: queue.Queue[Any] = queue.Queue()
        tls = None
        if fleet_dir is not None:  # a read-only operator: metrics and status
            tls = observer_tls(fleet_dir)
        self.transport = PahoTransport(url, f"bench-observer-{os.getpid()}", clean_start=True,
                                       tls=tls, rng=random.Random(0))

    def start(self) -> None:
        def on_event(event: Any) -> None:
            if isinstance(event, Connected):
                self.transport.subscribe(self.topics.metrics(), qos=1)
                self.transport.subscribe(self.topics.status_filter(), qos=1)
            elif isinstance(event, MessageReceived) and event.payload:
                self.events.put(event)

        self.transport.start(on_event)

    def poll(self, timeout: float) -> tuple[str, Any] | None:
        """("summary", RoundSummary) or ("status", (device, state)) or None."""
        try:
            msg = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        env = codec.decode(msg.payload)
        if msg.topic == self.topics.metrics():
            return "summary", codec.decode_body(env, RoundSummary)
        return "status", (msg.topic.rsplit("/", 1)[1], codec.decode_body(env, Status).state)

    def stop(self) -> None:
        self.transport.stop()


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # own session: a Ctrl-C in the terminal reaches only this script, which then
        # stops the services itself in order
        return subprocess.Popen([sys.executable, "-m", "fedgate", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def stray_children(workdir: Path) -> list[int]:
    """Our own children started for ``workdir`` that we hold no handle on (a Ctrl-C that
    lands inside Popen leaves one): matched by parent pid and config path."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and str(workdir) in cmdline:
            found.append(int(entry.name))
    return found


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_one(n: int, rounds: int, workdir: Path, concurrency: int, timeout_s: float,
            say: Callable[[str], None], edge_env: dict[str, str] | None = None,
            min_free_mb: float = 2048.0, downlink: str = "fp32", secure: bool = False,
            trace: bool = False,
            after_run: Callable[[str, Path | None], Any] | None = None) -> Run:
    """One fleet of ``n`` gateways for ``rounds`` rounds. ``secure``: a provisioned mTLS
    fleet with signed messages, connected straight to the broker (no counting proxy: it
    cannot read MQTT inside TLS, so there are no wire figures). ``trace``: every service
    writes step timestamps to its state folder's trace.jsonl. ``after_run(url, fleet_dir)``
    runs once the services are stopped, while the broker still runs."""
    run = Run(n, rounds)
    dataset = load_dataset("synthetic", gateways=n)
    spec = default_spec(dataset)
    topics = Topics(FLEET, TASK)
    options = DemoOptions(dataset="synthetic", gateways=n, rounds=rounds, fleet=FLEET,
                          task=TASK, round_timeout_s=600.0, workdir=str(workdir),
                          downlink=downlink, secure=secure, trace=trace)
    broker: RunningBroker | None = None
    proxy: CountingProxy | None = None
    observer: Observer | None = None
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        fleet_dir = workdir / "fleet" if secure else None
        if fleet_dir is not None:
            broker = start_secure_broker(fleet_dir, FLEET, [device_id(u) for u in dataset.units], TASK)
            url = f"mqtts://127.0.0.1:{broker.port}"
            files = write_configs(workdir, url, options, dataset, spec, TRAIN, fleet_dir)
        else:
            broker = start_broker(data_dir=workdir / "broker", prefer="mosquitto", fallback=False)
            url = broker.url
            proxy = CountingProxy(broker.port).start()
            files = write_configs(workdir, proxy.url, options, dataset, spec, TRAIN)
        # the aggregator talks to the broker directly: only gateway traffic is counted
        agg_toml = files.aggregator.read_text().replace(proxy.url, url) if proxy else files.aggregator.read_text()
        # every round waits for all N gateways (the demo's default quorum tolerates 1 in 10)
        agg_toml = re.sub(r"min_participants = \d+", f"min_participants = {n}", agg_toml)
        files.aggregator.write_text(agg_toml)
        observer = Observer(url, topics, fleet_dir)
        observer.start()
        aggregator = spawn(["aggregator", "run", "-c", str(files.aggregator)], workdir / "aggregator.log")
        procs.append(aggregator)
        devices = {f"gw-{unit}": path for unit, path in files.edges.items()}
        pending = list(devices)
        starting: dict[str, float] = {}
        online: set[str] = set()
        edge_procs: dict[str, subprocess.Popen[bytes]] = {}
        deadline = started + timeout_s
        cpu_at_2: dict[str, float] = {}

        def cpu_now() -> dict[str, float]:
            edges = [proc_cpu_s(p.pid) for p in edge_procs.values()]
            return {"aggregator": proc_cpu_s(aggregator.pid), "broker": proc_cpu_s(broker.pid if broker else None),
                    "gateways": sum(edges)}

        while len(run.summaries) < rounds:
            now = time.monotonic()
            if now > deadline:
                run.error = f"timed out after {timeout_s:.0f} s with {len(run.summaries)} rounds"
                break
            if aggregator.poll() is not None:
                run.error = f"the aggregator exited with code {aggregator.returncode}"
                break
            for device, since in list(starting.items()):
                if edge_procs[device].poll() is not None or now - since > 300:
                    run.never_online.append(device)  # exited or stuck: stop waiting for it
                    del starting[device]
            if pending and mem_available_mb() < min_free_mb:
                # the machine is shared: never push it into the OOM killer
                run.error = (f"stopped starting gateways at {len(edge_procs)} of {n}: "
                             f"MemAvailable {mem_available_mb():.0f} MB < {min_free_mb:.0f} MB")
                break
            while pending and len(starting) < concurrency:
                device = pending.pop(0)
                edge_procs[device] = spawn(["edge", "run", "-c", str(devices[device])],
                                           workdir / f"{device}.log", edge_env)
                procs.append(edge_procs[device])
                starting[device] = time.monotonic()
            item = observer.poll(0.2)
            if item is None:
                continue
            kind, value = item
            if kind == "status":
                device, state = value
                if state == "online" and device in devices:
                    online.add(device)
                    starting.pop(device, None)
                    if len(online) == n and run.online_after_s is None:
                        run.online_after_s = time.monotonic() - started
                        say(f"  N={n}: all {n} gateways online after {run.online_after_s:.1f} s")
            elif kind == "summary":
                s = value
                if s.round not in run.summaries:
                    run.summaries[s.round] = s
                    if s.round == 2:
                        cpu_at_2 = cpu_now()
                    say(f"  N={n}: round {s.round}: {len(s.participants)} participants, "
                        f"wall {s.wall_s:.2f} s, slowest training {s.metrics.get('train_s_max', 0):.3f} s")
        if len(run.summaries) >= 3 and cpu_at_2:
            end = cpu_now()
            steady = len(run.summaries) - 2
            run.cpu = {k: (end[k] - cpu_at_2[k]) / steady for k in end}
        time.sleep(1.0)  # let the last model reach every gateway before reading counters
        run.agg_mem = proc_memory(aggregator.pid)
        run.edge_mem = {d: proc_memory(p.pid) for d, p in edge_procs.items()}
        if proxy is not None:
            for conn_client, (up, down) in proxy.by_client().items():
                run.wire_total[conn_client] = (up, down)
            for device in edge_procs:
                marks = [(u, d) for c in proxy.connections() if c.client_id == device
                         for (topic, u, d) in c.marks if "/update/" in topic]
                run.update_marks[device] = len(marks)
                if len(marks) >= 2:
                    (u0, d0), (u1, d1) = marks[0], marks[-1]
                    run.wire[device] = ((u1 - u0) / (len(marks) - 1), (d1 - d0) / (len(marks) - 1))
        if after_run is not None and not run.error:
            stop_all(procs)
            run.after = after_run(url, fleet_dir)
    finally:
        stop_all(procs)
        for pid in stray_children(workdir):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if observer is not None:
            observer.stop()
        if proxy is not None:
            proxy.stop()
        if broker is not None:
            broker.stop()
        run.elapsed_s = time.monotonic() - started
    log = (workdir / "aggregator.log").read_text(errors="replace") if (workdir / "aggregator.log").exists() else ""
    run.agg_log = {"quorum_missed": log.count("quorum missed"), "rejected": log.count("rejected")}
    return run


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def summarize(run: Run) -> dict[str, Any]:
    model_bytes = 932 * 4
    steady = [run.summaries[r] for r in sorted(run.summaries) if r >= 2]
    overheads = [s.wall_s - s.metrics.get("train_s_max", 0.0) for s in steady]
    ups = [w[0] for w in run.wire.values()]
    downs = [w[1] for w in run.wire.values()]
    hwm = [m[0] / 1024 for m in run.edge_mem.values() if m[0]]
    rss = [m[1] / 1024 for m in run.edge_mem.values() if m[1]]
    complete = (len(run.summaries) == run.rounds and not run.error
                and all(len(s.participants) == run.n for s in run.summaries.values()))
    return {
        "n": run.n, "rounds": run.rounds, "rounds_done": len(run.summaries),
        "all_complete": complete, "error": run.error,
        "participants": [len(run.summaries[r].participants) for r in sorted(run.summaries)],
        "round1_wall_s": run.summaries[1].wall_s if 1 in run.summaries else float("nan"),
        "online_after_s": run.online_after_s, "never_online": run.never_online,
        "wall_s": [s.wall_s for s in steady],
        "train_s_max": [s.metrics.get("train_s_max", 0.0) for s in steady],
        "overhead_mean_s": _mean(overheads), "overhead_max_s": max(overheads, default=float("nan")),
        "wire_up_per_client_round": _mean(ups), "wire_down_per_client_round": _mean(downs),
        "wire_up_max": max(ups, default=float("nan")), "wire_down_max": max(downs, default=float("nan")),
        "clients_measured": len(ups),
        "app_up_per_client_round": _mean([s.bytes_up / len(s.participants) for s in steady]),
        "app_down_per_client_round": _mean([s.bytes_down / len(s.participants) for s in steady]),
        "model_fp32_bytes": model_bytes,
        "ratio_up": _mean(ups) / model_bytes if ups else float("nan"),
        "ratio_down": _mean(downs) / model_bytes if downs else float("nan"),
        "edge_hwm_mb_mean": _mean(hwm), "edge_hwm_mb_max": max(hwm, default=float("nan")),
        "edge_rss_mb_mean": _mean(rss), "edge_rss_mb_max": max(rss, default=float("nan")),
        "edge_procs_read": len(rss),
        "agg_hwm_mb": run.agg_mem[0] / 1024, "agg_rss_mb": run.agg_mem[1] / 1024,
        "rejected": dict(steady[-1].rejected) if steady else {},
        "aggregator_log": run.agg_log, "elapsed_s": run.elapsed_s,
    }


HEADER = ("| N | rounds done | all N every round | overhead mean / max (s) | wire up / down per "
          "client-round (B) | ratio to fp32 up / down | app-level up / down (B) | edge VmHWM "
          "mean / max (MB) | edge VmRSS mean / max (MB) | aggregator VmHWM / VmRSS (MB) |")


def table_row(r: dict[str, Any]) -> str:
    return (f"| {r['n']} | {r['rounds_done']}/{r['rounds']} | {'yes' if r['all_complete'] else 'NO'} "
            f"| {r['overhead_mean_s']:.3f} / {r['overhead_max_s']:.3f} "
            f"| {r['wire_up_per_client_round']:.0f} / {r['wire_down_per_client_round']:.0f} "
            f"| {r['ratio_up']:.3f} / {r['ratio_down']:.3f} "
            f"| {r['app_up_per_client_round']:.0f} / {r['app_down_per_client_round']:.0f} "
            f"| {r['edge_hwm_mb_mean']:.1f} / {r['edge_hwm_mb_max']:.1f} "
            f"| {r['edge_rss_mb_mean']:.1f} / {r['edge_rss_mb_max']:.1f} "
            f"| {r['agg_hwm_mb']:.1f} / {r['agg_rss_mb']:.1f} |")


def detail_lines(r: dict[str, Any]) -> list[str]:
    return [
        f"- N = {r['n']}: all gateways online after {r['online_after_s'] or float('nan'):.1f} s; "
        f"round 1 (start-up included, excluded above) {r['round1_wall_s']:.1f} s; "
        f"participants per round {r['participants']}; steady-state wall_s "
        f"{[round(x, 3) for x in r['wall_s']]}, train_s_max {[round(x, 3) for x in r['train_s_max']]}; "
        f"wire max over clients up {r['wire_up_max']:.0f} B / down {r['wire_down_max']:.0f} B "
        f"({r['clients_measured']} clients measured); rejected {r['rejected']}; aggregator log "
        f"{r['aggregator_log']}; never online {r['never_online'] or 'none'}; "
        f"total {r['elapsed_s']:.0f} s" + (f"; ERROR: {r['error']}" if r["error"] else ""),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--gateways", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--start-concurrency", type=int, default=4)
    ap.add_argument("--downlink", default="fp32", choices=("fp32", "int8", "delta"),
                    help="how the global model travels to the gateways")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per N, seconds")
    ap.add_argument("--results", default=str(HERE / "RESULTS_rounds.md"))
    ap.add_argument("--json", default="", help="also write the raw figures here")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (logs)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=0,
                    help="set MALLOC_MMAP_THRESHOLD_ for the gateway processes (glibc; "
                         "0 = leave malloc alone)")
    ap.add_argument("--min-free-mb", type=float, default=2048.0,
                    help="stop starting gateways when MemAvailable falls below this")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 includes start-up and is excluded)")

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    def say(line: str) -> None:
        print(line, flush=True)

    load0 = os.getloadavg()
    results: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="fedgate-bench-rounds-"))
    say(f"run folders under {root}")
    command = "python bench/bench_rounds.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results_path = Path(args.results)
    before = results_path.read_text() if results_path.exists() else ""
    for n in args.gateways:
        say(f"N = {n}: starting the broker, the proxy, the aggregator and {n} gateways")
        edge_env = ({"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)}
                    if args.malloc_mmap_threshold else None)
        run = run_one(n, args.rounds, root / f"n{n}", args.start_concurrency, args.timeout, say,
                      edge_env, args.min_free_mb, args.downlink)
        results.append(summarize(run))
        say(HEADER)
        say(table_row(results[-1]))
        # rewritten after every N, so a long run that is cut short keeps what it measured
        results_path.write_text(before + results_section(command, results, load0, os.getloadavg(),
                                                         fresh=not before.strip()))
    load1 = os.getloadavg()
    say("")
    say(HEADER)
    say("|" + "---|" * HEADER.count(" |"))
    for r in results:
        say(table_row(r))
    say(f"appended to {args.results} (load average {load1[0]:.1f} at the end)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["all_complete"] for r in results) else 1


def results_section(command: str, results: list[dict[str, Any]],
                    load0: tuple[float, float, float], load1: tuple[float, float, float],
                    *, fresh: bool) -> str:
    """This run's Markdown section (with the file's title if the file is new)."""
    title = ("# System benchmark: rounds, bytes and memory at N gateways\n\n"
             "Produced by bench/bench_rounds.py (see its docstring for the method).\n"
             if fresh else "")
    lines = [
        f"\n## {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} - `{command}`\n",
        f"Machine: {os.cpu_count()} CPUs (nproc), {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()} {platform.release()}; shared with "
        f"other work while measuring (1-min load average {load0[0]:.1f} at start, "
        f"{load1[0]:.1f} at the last N). Task: synthetic 24 features x 4 classes, 2,000 "
        f"samples per gateway, Dirichlet(0.5); MLP 24-32-4 (932 parameters, fp32 3,728 B); "
        f"1 local epoch, batch 32, SGD lr 0.1; FedAvg; min_participants = N; "
        f"round_timeout_s 600.\n",
        "Steady state = rounds 2..R: round 1 includes start-up and is excluded from every "
        "figure. Wire bytes: MQTT bytes through the counting proxy per gateway per round "
        "(headers, acks, pings included), mean over gateways. App-level: the round "
        "summary's bytes_up / bytes_down divided by participants (payload + topic only).\n",
        HEADER,
        "|" + "---|" * HEADER.count(" |"),
        *[table_row(r) for r in results],
        "",
        *[line for r in results for line in detail_lines(r)],
        "",
        f"For comparison: {FLOWER}",
        "",
    ]
    return title + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
