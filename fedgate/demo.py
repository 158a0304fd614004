"""`fedgate demo`: a whole federated run on real data, on one machine.

It starts a broker (Mosquitto when on PATH, else the embedded one; or uses ``--broker``),
writes one config per service into the run folder, starts the aggregator and one gateway
agent per unit of the data set as separate processes (`fedgate aggregator run`,
`fedgate edge run`), and watches the metrics and model topics like any other subscriber:
each global model is evaluated on the pooled held-out test split, which only this
simulation has. After the run it trains the centralized and local-only baselines on the
same split with the same training budget and prints them beside the federated result.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import msgspec
import numpy as np

from edge.participant import receive_model
from fedcore.datasets import (
    FederatedDataset,
    default_spec,
    default_train_config,
    evaluate_dataset,
    load_dataset,
)
from fedcore.errors import ConfigError
from fedcore.learning.metrics import LOWER_IS_BETTER
from fedcore.learning.models import init_params
from fedcore.learning.training import train_local
from fedcore.protocol import codec
from fedcore.protocol.messages import GlobalModel, ModelSpec, RoundSummary, Status, TrainConfig
from fedcore.protocol.topics import Topics
from fedcore.transport.base import MessageReceived, TlsSettings
from fedcore.transport.paho import PahoTransport
from fedgate.broker import RunningBroker, free_port, start_broker
from fedgate.demo_configs import DemoFailed, DemoOptions, device_id, malicious_units, write_configs

# The read-only operator identity the demo and the benches watch a secure fleet with: the
# broker names sessions after certificates, so borrowing the aggregator's would take its
# session over.
OBSERVER = "observer"


def observer_tls(fleet_dir: Path) -> TlsSettings:
    bundle = fleet_dir / "operators" / OBSERVER
    return TlsSettings(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")


def start_secure_broker(fleet_dir: Path, fleet: str, devices: list[str], task: str) -> RunningBroker:
    """Provision a fleet of one declared task (CA, aggregator, one identity per gateway)
    and run Mosquitto with the generated mTLS listener and ACL on a free loopback port."""
    from fedgate import provision

    provision.init_ca(fleet_dir, fleet=fleet, tasks=[task])
    provision.provision_aggregator(fleet_dir)
    provision.provision_operator(fleet_dir, OBSERVER)
    for device in devices:
        provision.provision_device(fleet_dir, device)
    port = free_port()
    conf = provision.provision_broker(fleet_dir, port=port, run_as_user="root")
    log = fleet_dir / "broker" / "mosquitto.log"
    return RunningBroker("mosquitto", port, ["mosquitto", "-c", str(conf)], log, 10.0).start()


@dataclass
class RoundRow:
    round: int
    participants: int
    metric: float
    bytes_up: int
    bytes_down: int
    wall_s: float
    epsilon: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def _baseline_rounds(
    spec: ModelSpec, x: np.ndarray, y: np.ndarray, train: TrainConfig, rounds: int, seed: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = init_params(spec, np.random.default_rng(seed))
    for _ in range(rounds):
        weights, _ = train_local(spec, weights, x, y, train, rng)
    return weights


def baselines(dataset: FederatedDataset, spec: ModelSpec, train: TrainConfig, rounds: int,
              seed: int) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """Centralized (pooled training data) and local-only (mean over gateways) on the same
    test split, each with the federated run's training budget per round, on EVERY metric
    the task reports (not only the headline). Returns (centralized, local-only mean,
    local-only per gateway), each a metric -> value map."""
    units = list(dataset.units.values())
    x_all = np.concatenate([u.x_train for u in units])
    y_all = np.concatenate([u.y_train for u in units])
    pooled_train = msgspec.structs.replace(train, max_steps=train.max_steps * len(units)) if train.max_steps else train
    central = _baseline_rounds(spec, x_all, y_all, pooled_train, rounds, seed)
    centralized = evaluate_dataset(dataset, spec, central)
    per_unit: dict[str, dict[str, float]] = {}
    for name, unit in dataset.units.items():
        w = _baseline_rounds(spec, unit.x_train, unit.y_train, train, rounds, seed)
        per_unit[name] = evaluate_dataset(dataset, spec, w)
    local_only = {k: float(np.mean([m[k] for m in per_unit.values()])) for k in centralized}
    return centralized, local_only, per_unit


def choose_metric(dataset: FederatedDataset, spec: ModelSpec, wanted: str) -> tuple[str, bool]:
    """The headline metric: ``wanted`` when given (one the task reports), else the data
    set's (positive-class F1 for a rare binary event). A bad name is a ConfigError listing
    the choices (exit 78)."""
    if not wanted:
        return dataset.primary_metric
    reported = sorted(k for k in evaluate_dataset(dataset, spec, init_params(spec, np.random.default_rng(0)))
                      if k != "positive_rate")  # a property of the data, not of a model
    if wanted not in reported:
        raise ConfigError("--metric", "metric", wanted, f"must be one of {', '.join(reported)}")
    return wanted, wanted not in LOWER_IS_BETTER


class Observer:
    """Subscribes to the metrics and model topics and pairs each summary with a test score."""

    def __init__(self, url: str, topics: Topics, fleet_dir: Path | None = None) -> None:
        self.topics = topics
        self.events: queue.Queue[Any] = queue.Queue()
        self.online: set[str] = set()
        tls = None
        client_id = f"demo-observer-{os.getpid()}"
        if fleet_dir is not None:
            tls = observer_tls(fleet_dir)
            client_id = OBSERVER
        self.transport = PahoTransport(url, client_id, clean_start=True, tls=tls,
                                       rng=random.Random(0))

    def start(self) -> None:
        def on_event(event: Any) -> None:
            self.events.put(event)
            if type(event).__name__ == "Connected":
                self.transport.subscribe(self.topics.metrics())
                self.transport.subscribe(self.topics.model())
                self.transport.subscribe(self.topics.status_filter())

        self.transport.start(on_event)

    def next(self, timeout: float) -> RoundSummary | GlobalModel | None:
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if not isinstance(event, MessageReceived) or not event.payload or event.retained:
            return None  # subscribed before the run started: everything of ours arrives live
        env = codec.decode(event.payload)
        if event.topic == self.topics.metrics():
            return codec.decode_body(env, RoundSummary)
        if event.topic == self.topics.model():
            return codec.decode_body(env, GlobalModel)
        if codec.decode_body(env, Status).state == "online":
            self.online.add(env.sender)
        return None

    def wait_online(self, count: int, timeout: float) -> int:
        """Wait until ``count`` gateways announced themselves online; how many did."""
        deadline = time.monotonic() + timeout
        while len(self.online) < count and time.monotonic() < deadline:
            self.next(timeout=0.2)
        return len(self.online)

    def stop(self) -> None:
        self.transport.stop()


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "fedgate", *args], stdout=log, stderr=log,
                            start_new_session=True)


def _format_row(row: RoundRow, metric: str) -> str:
    eps = f"{row.epsilon:8.3f}" if row.epsilon is not None else "       -"
    return (f"{row.round:5d} {row.participants:6d} {row.metric:12.4f} {row.bytes_up:10d} "
            f"{row.bytes_down:10d} {row.wall_s:7.2f} {eps}")


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``options.out``) the run record."""
    say: Callable[[str], None] = lambda line: print(line, file=out, flush=True)  # noqa: E731
    if not options.task:
        # A task name of its own per run: retained models and rounds of an earlier run on the
        # same broker would otherwise look newer than this run's (gateways refuse rollbacks).
        options = replace(options, task=time.strftime("run-%Y%m%d-%H%M%S-") + os.urandom(2).hex())
    # absolute: the configs it writes are read from inside it (relative paths there would
    # resolve against the config's folder)
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="fedgate-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if options.field_bus:  # field-bus mode: see fedgate/fieldbus_demo.py
        from fedgate.fieldbus_demo import field_bus_dataset, fill_stores

        dataset = field_bus_dataset(options)
    else:
        dataset = load_dataset(options.dataset, gateways=options.gateways or None,
                               max_rows_per_unit=options.max_rows_per_unit or None,
                               **options.csv_options())
    spec = default_spec(dataset)
    train = options.train or default_train_config(dataset)
    if options.qat:
        train = msgspec.structs.replace(train, qat=True)
    metric, higher_is_better = choose_metric(dataset, spec, options.metric)
    positive_rate = dataset.train_positive_rate
    say(f"data set {dataset.name}: {len(dataset.units)} gateways "
        f"({', '.join(dataset.units)}), {sum(len(u.y_train) for u in dataset.units.values())} "
        f"training rows, {len(dataset.y_test)} test rows; metric {metric}"
        + (f"; positive rate {positive_rate:.4f} of training rows, "
           f"{float(np.mean(dataset.y_test == 1)):.4f} of test rows" if positive_rate is not None else ""))
    renamed = {u: device_id(u) for u in dataset.units if device_id(u) != f"gw-{u}"}
    if renamed:  # unit names that are not valid ids (spaces, '/', '#', ...): shown once
        say("gateway ids of units whose names are not valid ids: "
            + ", ".join(f"{u!r} -> {d}" for u, d in renamed.items()))
    # Every demo is a new run (a task name of its own): the state folders a previous run left
    # in the same --workdir would make its aggregator resume that finished run and wait forever.
    earlier = [d for d in (workdir / "aggregator-state", workdir / "fleet",
                           *(workdir / f"edge-{device_id(u)}" for u in dataset.units)) if d.is_dir()]
    if earlier:
        say(f"replacing the state of an earlier demo run in {workdir}")
        for folder in earlier:
            shutil.rmtree(folder)
    broker: RunningBroker | None = None
    procs: list[subprocess.Popen[bytes]] = []
    observer: Observer | None = None
    rows: list[RoundRow] = []
    field_bus: dict[str, Any] | None = None
    try:
        fleet_dir = None
        if options.secure:
            fleet_dir = workdir / "fleet"
            broker = start_secure_broker(fleet_dir, options.fleet, [device_id(u) for u in dataset.units],
                                         options.task)
            url = broker.url.replace("mqtt://", "mqtts://")
            say(f"fleet provisioned in {fleet_dir}: mTLS broker (Mosquitto, generated ACL) on {url}, "
                "signed messages")
        elif options.broker:
            url = options.broker
        else:
            broker = start_broker(data_dir=workdir / "broker")
            url = broker.url
            say(f"broker: {broker.kind} on {url}")
        topics = Topics(options.fleet, options.task)
        files = write_configs(workdir, url, options, dataset, spec, train, fleet_dir)
        field_bus = fill_stores(workdir, options, dataset, say) if options.field_bus else None
        observer = Observer(url, topics, fleet_dir)
        observer.start()
        for unit, path in files.edges.items():
            procs.append(_spawn(["edge", "run", "-c", str(path)], workdir / f"edge-{device_id(unit).removeprefix('gw-')}.log"))
        # the gateways first, so that round 1 starts with the whole fleet online
        online = observer.wait_online(len(files.edges), timeout=120)
        procs.insert(0, _spawn(["aggregator", "run", "-c", str(files.aggregator)],
                               workdir / "aggregator.log"))
        say(f"started {len(files.edges)} gateway agents ({online} online) and the aggregator "
            f"(logs in {workdir})")
        if bad := malicious_units(list(dataset.units), options):
            say(f"EXPERIMENT: {', '.join(bad)} run the {options.attack!r} attack; "
                f"fusion rule {options.fusion!r}")
        say(f"{'round':>5} {'parts':>6} {metric:>12} {'bytes_up':>10} {'bytes_down':>10} {'wall_s':>7} {'epsilon':>8}")
        rows = _watch(observer, dataset, metric, options, procs, say)
    except KeyboardInterrupt:
        say("interrupted: stopping the services")
        _stop_all(procs, observer, broker)
        raise
    _stop_all(procs, observer, broker)
    if len(rows) < options.rounds:
        raise DemoFailed(f"only {len(rows)} of {options.rounds} rounds completed; see logs in {workdir}")
    say("training the baselines on the same split ...")
    centralized, local_only, per_unit = baselines(dataset, spec, train, options.rounds, options.seed)
    federated = rows[-1].metric
    _say_final_table(say, metric, rows[-1].extra, centralized, local_only, len(per_unit))
    record = {
        "dataset": dataset.name,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "gateways": len(dataset.units),
        "rounds": [
            {"round": r.round, "participants": r.participants, "metric": r.metric,
             "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "wall_s": r.wall_s,
             **({"epsilon": r.epsilon} if r.epsilon is not None else {}), **r.extra}
            for r in rows
        ],
        **({"positive_rate": {"train": positive_rate,
                              "test": float(np.mean(dataset.y_test == 1))}}
           if positive_rate is not None else {}),
        "federated": federated,
        "centralized": centralized[metric],
        "local_only": local_only[metric],
        "local_only_per_gateway": {u: m[metric] for u, m in per_unit.items()},
        "final_metrics": rows[-1].extra,
        # every metric the task reports, beside the headline ones above
        "baselines": {"centralized": centralized, "local_only": local_only,
                      "local_only_per_gateway": per_unit},
        "config": options.describe(),
        **({"field_bus": field_bus} if field_bus else {}),
    }
    if options.out:
        Path(options.out).write_text(json.dumps(record, indent=2))
        say(f"wrote {options.out}")
    return record


def _watch(observer: Observer, dataset: FederatedDataset, metric: str, options: DemoOptions,
           procs: list[subprocess.Popen[bytes]], say: Callable[[str], None]) -> list[RoundRow]:
    scores: dict[int, dict[str, float]] = {}
    summaries: dict[int, RoundSummary] = {}
    rows: list[RoundRow] = []
    held_version, held = -1, None  # the model as the gateways hold it
    scaled: tuple[ModelSpec, FederatedDataset] | None = None
    deadline = time.monotonic() + options.timeout_s
    while len(rows) < options.rounds:
        if time.monotonic() > deadline:
            say(f"timed out after {options.timeout_s:.0f} s")
            break
        if procs[0].poll() is not None and procs[0].returncode != 0:
            say(f"the aggregator exited with code {procs[0].returncode}")
            break
        item = observer.next(timeout=0.5)
        if isinstance(item, GlobalModel):
            # decoded as a gateway decodes it (int8, or a delta on the previous version)
            weights = receive_model(item, held_version, held)
            if weights is not None and item.version != held_version:
                held_version, held = item.version, weights
                if item.version > 0:
                    if item.spec.has_scaler:  # store-fed gateways: the lineage's fleet scaler
                        from fedgate.fieldbus_demo import scaled_for

                        if scaled is None or scaled[0] != item.spec:
                            scaled = (item.spec, scaled_for(dataset, item.spec))
                        scores[item.version] = evaluate_dataset(scaled[1], item.spec, weights)
                    else:
                        scores[item.version] = evaluate_dataset(dataset, item.spec, weights)
        elif isinstance(item, RoundSummary):
            summaries[item.model_version] = item
        for version in sorted(set(scores) & set(summaries)):
            s, score = summaries.pop(version), scores.pop(version)
            if any(r.round == s.round for r in rows):
                continue
            eps = max(s.epsilon.values()) if s.epsilon else None
            row = RoundRow(s.round, len(s.participants), score[metric], s.bytes_up, s.bytes_down,
                           s.wall_s, eps, {k: v for k, v in score.items()})
            rows.append(row)
            say(_format_row(row, metric))
            for alert in s.alerts:
                say(f"      ALERT: {alert}")
    return rows


def _say_final_table(say: Callable[[str], None], metric: str, federated: dict[str, float],
                     centralized: dict[str, float], local_only: dict[str, float], units: int) -> None:
    """The headline first, then every other metric, federated beside the baselines."""
    say(f"{'metric':>14} {'federated':>10} {'centralized':>12} {'local-only':>11}  "
        f"(local-only: mean of {units} gateways)")
    for name in [metric, *sorted(k for k in centralized if k != metric)]:
        mark = " <- headline" if name == metric else ""
        say(f"{name:>14} {federated.get(name, float('nan')):10.4f} {centralized[name]:12.4f} "
            f"{local_only[name]:11.4f}{mark}")


def _stop_all(procs: list[subprocess.Popen[bytes]], observer: Observer | None,
              broker: RunningBroker | None) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if observer is not None:
        observer.stop()
    if broker is not None:
        broker.stop()
